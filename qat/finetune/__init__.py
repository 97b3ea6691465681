"""Fine-tuning the low-bit model: peft LoRA / QA-LoRA adapters on a frozen student or export (`qat finetune`), and
merging them back into the low-bit weights (`qat merge`). See docs/FINETUNE.md."""
from qat.distill.memory import silence_bitsandbytes

silence_bitsandbytes()  # peft imports bitsandbytes, whose CPU backend logs on import about an optional hub kernel
