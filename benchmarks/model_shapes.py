"""Gradient sets of real model architectures for the benchmarks.

``mlp-25.7m`` is a real ``torch.nn`` model whose gradients come from one forward/backward
on synthetic data. ``gpt2-124m`` and ``llama-1b`` are the parameter shapes of GPT-2 small
and a Llama-3.2-1B-style decoder, filled with gradient-like noise (scaled normal values),
so that tensor counts, sizes and bytes are those of real training.
"""

from __future__ import annotations

import itertools

import torch


def builtin_mlp(width: int = 2048, depth: int = 5, io: int = 1152) -> torch.nn.Sequential:
    """The built-in MLP: 25.7M parameters (102.8 MB of float32 gradients) with the defaults."""
    sizes = [io, *([width] * (depth + 1)), io]
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def mlp_gradients(device: str = "cpu", batch: int = 64, seed: int = 0) -> tuple[list[torch.Tensor], list[str]]:
    """Real gradients of the built-in MLP after one regression step on synthetic data."""
    torch.manual_seed(seed)
    model = builtin_mlp().to(device)
    inputs = torch.randn(batch, model[0].in_features, device=device)
    targets = torch.randn(batch, model[-1].out_features, device=device)
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    named = [(name, p.grad) for name, p in model.named_parameters()]
    return [g for _, g in named], [name for name, _ in named]


def gpt2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 small (124M parameters): 148 tensors."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes = [("wte", (vocab, d)), ("wpe", (context, d))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def llama_1b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-3.2-1B-style decoder (1.24B parameters, tied embeddings): 146 tensors."""
    d, vocab, ffn, layers, kv = 2048, 128256, 8192, 16, 512
    shapes = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (ffn, d)),
            (p + "mlp.up_proj.weight", (ffn, d)),
            (p + "mlp.down_proj.weight", (d, ffn)),
        ]
    return [*shapes, ("norm.weight", (d,))]


def small_model_shapes(blocks: int = 200, width: int = 64) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of ``blocks`` x (Linear(width, width) + LayerNorm(width)): many small
    tensors, as biases and norms are in real models (``bench_overhead.py``'s "small" model)."""
    shapes = []
    for i in range(blocks):
        linear, norm = 2 * i, 2 * i + 1
        shapes += [(f"{linear}.weight", (width, width)), (f"{linear}.bias", (width,))]
        shapes += [(f"{norm}.weight", (width,)), (f"{norm}.bias", (width,))]
    return shapes


def synthetic_gradients(
    shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[list[torch.Tensor], list[str]]:
    """Gradient-like tensors of the given shapes: normal noise with a per-tensor scale
    between 1e-5 and 1e-2 (spread over the histogram like real gradients)."""
    g = torch.Generator(device=device).manual_seed(seed)
    grads = []
    for i, (_, shape) in enumerate(shapes):
        scale = 10.0 ** (-5 + 3 * ((i * 0.618) % 1.0))
        grads.append((torch.randn(shape, generator=g, device=device) * scale).to(dtype))
    return grads, [name for name, _ in shapes]
