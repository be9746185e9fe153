"""GPT-2 and GPT-2.5 in pure PyTorch: config presets, the model, HF conversion, save/load."""
from models import hf
from models.config import PRESETS, ModelConfig, get_config, list_configs, padded_vocab_size
from models.gpt import GPT, KVCache
from models.io import load, save

__all__ = ["ModelConfig", "GPT", "KVCache", "PRESETS", "get_config", "list_configs", "padded_vocab_size", "save",
           "load", "hf"]
