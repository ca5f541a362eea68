"""The three stages of a distillation: synthesize, finetune, evaluate. Each is a library function and a CLI command."""
