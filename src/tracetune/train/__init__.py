"""Training: SFT and step-wise DPO of VLM controllers with TRL, PEFT and accelerate."""
