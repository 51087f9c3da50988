"""Fine-tuning: LoRA layers and adapter files (`adapters`), data (`data`), the loop (`trainer`),
and folding adapters into a standalone checkpoint (`fuse`)."""
