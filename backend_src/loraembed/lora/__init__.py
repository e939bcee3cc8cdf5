"""LoRA adapters: the PEFT on-disk contract, the device-slot registry and segmented LoRA layers."""
