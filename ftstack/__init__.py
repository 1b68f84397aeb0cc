"""ftstack: fine-tune Hugging Face causal LMs on Amazon SageMaker (operator side)."""

__version__ = "0.1.0"
