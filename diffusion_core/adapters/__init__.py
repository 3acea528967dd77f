"""Ways users customise a checkpoint without retraining it: LoRA and LyCORIS files (lora.py)."""
