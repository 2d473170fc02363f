"""Interoperability with Hugging Face: export to transformers and safetensors, import GPT-2.

- `export_hf`: a GPT as a transformers directory (GPT2LMHeadModel or LlamaForCausalLM layout)
  with its tokenizer as Hugging Face files, same logits and same ids.
- `export_safetensors` / `load_safetensors_dir`: gptlab's own directory, for any GPT.
- `init_model_from_hf`: a local Hugging Face GPT-2 directory as our GPT and tokenizer.
- `export_gguf`: a GPT (GPT-2 or Llama layout) and its tokenizer as one GGUF file for llama.cpp.
- `load_adapted`: the model of any checkpoint, a LoRA adapter checkpoint merged with its base.
"""

from gptlab.interop.base_models import load_adapted
from gptlab.interop.gguf_export import export_gguf
from gptlab.interop.hf_export import export_hf, hf_architecture
from gptlab.interop.hf_import import init_model_from_hf
from gptlab.interop.hf_tokenizer import hf_tokenizer_files
from gptlab.interop.safetensors_io import export_safetensors, is_safetensors_dir, load_safetensors_dir

__all__ = [
    "export_gguf",
    "export_hf",
    "export_safetensors",
    "hf_architecture",
    "hf_tokenizer_files",
    "init_model_from_hf",
    "is_safetensors_dir",
    "load_adapted",
    "load_safetensors_dir",
]
