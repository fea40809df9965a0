"""GLM-4.5 / GLM-4.5-Air in MLX.

Reads like the architecture: embed -> N x [RMSNorm -> attention -> residual ->
RMSNorm -> dense MLP or MoE -> residual] -> RMSNorm -> lm_head, plus the
multi-token-prediction (MTP) layer kept beside the trunk. Parameter names are
those of the Hugging Face checkpoint, except that routed experts are stacked
([E, out, in] under `mlp.experts.{gate,up,down}_proj`) and the MTP layer
`model.layers.{N}` lives at `mtp.0`; glm_mlx.loading does that renaming.
"""

from __future__ import annotations

import contextlib
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import KVCache, attend, make_caches
from .config import ModelArgs
from .experts import QuantizedSwitchLinear, SwitchGLU, prefilling
from .kernels import (attention_fits, backend, decode_attention, linear_decode, moe_decode, position, qkv_decode,
                      qkv_decode_cached, router_logits, router_select)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        self.scale = hd**-0.5
        d = args.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        if args.use_qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.use_qk_norm = args.use_qk_norm
        self.rope_dims, self.rope_theta = args.rope_dims, args.rope_theta

    def __call__(self, x: mx.array, cache: KVCache | None = None, residual: mx.array | None = None,
                 norm: nn.RMSNorm | None = None) -> mx.array:
        """Attention output [B, T, D] of x normalised by `norm` (when given), plus `residual` when
        given (one token on a GPU: in the same launch as o_proj, and q, k, v in one launch with the
        norm and RoPE: glm_mlx/kernels.py)."""
        q, k, v = self.project(x, cache.offset if cache is not None else 0, norm)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.output(attend(q, k, v, cache, self.scale, causal=x.shape[1] > 1), residual)

    def project(self, x: mx.array, offset: int | mx.array,
                norm: nn.RMSNorm | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v [B, heads, T, head_dim] of x [B, T, D] normalised by `norm` (when given), RoPE'd from
        position `offset` (an int, or an int array: a compiled step's input)."""
        B, T, _ = x.shape
        qp, kp, vp = self.q_proj, self.k_proj, self.v_proj
        hd = self.head_dim
        rope = dict(dims=self.rope_dims, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)
        if B * T == 1 and decode_kernels(qp, kp, vp):
            # one launch; RoPE in it too unless q and k are normalised per head first
            fused_rope = None if self.use_qk_norm else (self.rope_dims, self.rope_theta, offset)
            q, k, v = qkv_decode(x, qp, kp, vp,
                                 ((1, self.n_heads, 1, hd), (1, self.n_kv_heads, 1, hd), (1, self.n_kv_heads, 1, hd)),
                                 norm, fused_rope)
            if fused_rope is not None:
                return q, k, v
        else:
            x = _normed(x, norm)
            q = qp(x).reshape(B, T, self.n_heads, hd).transpose(0, 2, 1, 3)
            k = kp(x).reshape(B, T, self.n_kv_heads, hd).transpose(0, 2, 1, 3)
            v = vp(x).reshape(B, T, self.n_kv_heads, hd).transpose(0, 2, 1, 3)
        if self.use_qk_norm:  # over head_dim, the last axis either way
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE on the first rope_dims of each head, rotate-half form; the rest passes.
        return mx.fast.rope(q, **rope), mx.fast.rope(k, **rope), v

    def writes_cache(self, cache) -> bool:
        """Whether one token's q|k|v launch can write k and v into this cache itself
        (project_cached): a float KVCache, plain quantized projections, RoPE in the launch."""
        return (KV_IN_KERNEL and type(cache) is KVCache and not self.use_qk_norm
                and decode_kernels(self.q_proj, self.k_proj, self.v_proj))

    def project_cached(self, x: mx.array, offset: mx.array, keys: mx.array, values: mx.array, after: mx.array,
                       norm: nn.RMSNorm | None = None) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """One token's q [1, heads, 1, head_dim], the KV cache's buffers with its k and v at position
        `offset` (an int array), and what the next launch takes as `after`: kernels.qkv_decode_cached."""
        hd = self.head_dim
        return qkv_decode_cached(x, self.q_proj, self.k_proj, self.v_proj,
                                 ((1, self.n_heads, 1, hd), (1, self.n_kv_heads, 1, hd), (1, self.n_kv_heads, 1, hd)),
                                 norm, (self.rope_dims, self.rope_theta, offset), keys, values, after)

    def attends_in_place(self, dtype) -> bool:
        """Whether one token's attention reads the KV cache's buffers in place, its length on the device
        (kernels.decode_attention), after a q|k|v launch that wrote them (writes_cache)."""
        return ATTENTION_IN_KERNEL and attention_fits(self.n_heads, self.n_kv_heads, self.head_dim, dtype)

    def output(self, o: mx.array, residual: mx.array | None = None) -> mx.array:
        """o_proj of the heads' outputs o [B, heads, T, head_dim] -> [B, T, D], plus `residual` when given."""
        B, _, T, _ = o.shape
        op = self.o_proj
        if B * T == 1 and decode_kernels(op):  # o goes in as it is: the kernel reads it flat
            if residual is None:
                return linear_decode(o.reshape(B, T, -1), op).astype(o.dtype)
            return linear_decode(o, op, residual)
        y = op(o.transpose(0, 2, 1, 3).reshape(B, T, -1))
        return y if residual is None else residual + y


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array, residual: mx.array | None = None, norm: nn.RMSNorm | None = None) -> mx.array:
        """down(silu(gate(x)) * up(x)) of x normalised by `norm` (when given), plus `residual` when given
        (one token on a GPU: two launches, the norm in the first)."""
        if x.size == x.shape[-1] and self.decodes():
            return moe_decode(x, None, None, None, self, residual, norm).astype(x.dtype)
        x = _normed(x, norm)
        y = self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if residual is None else residual + y

    def decodes(self) -> bool:
        """Whether one token goes through the decode kernels (glm_mlx/kernels.py)."""
        return decode_kernels(self.gate_proj, self.up_proj, self.down_proj)


class Router(nn.Module):
    """Sigmoid router with a selection-only correction bias (noaux_tc), in float32."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size), dtype=mx.float32)
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)
        self.top_k, self.n_group, self.topk_group = args.num_experts_per_tok, args.n_group, args.topk_group
        self.norm_topk_prob, self.scaling = args.norm_topk_prob, args.routed_scaling_factor

    def __call__(self, x: mx.array, norm: nn.RMSNorm | None = None) -> tuple[mx.array, mx.array]:
        """(expert ids, weights) [..., top_k] for x normalised by `norm` (when given)."""
        f32 = mx.float32
        if x.size == x.shape[-1] and decode_kernels() and self.topk_group >= self.n_group:
            # one token on a GPU: the logits (the norm included), then everything after them, one
            # launch each (glm_mlx/kernels.py)
            return router_select(router_logits(x, self.weight, norm), self.e_score_correction_bias.astype(f32),
                                 self.top_k, self.norm_topk_prob, self.scaling, x.shape[:-1])
        x = _normed(x, norm)
        logits = x.astype(f32) @ self.weight.astype(f32).T
        scores = mx.sigmoid(logits)
        choice = scores + self.e_score_correction_bias.astype(mx.float32)
        if self.topk_group < self.n_group:
            # Keep the topk_group groups whose two best experts score highest.
            g = mx.unflatten(choice, -1, (self.n_group, -1))
            group_score = mx.topk(g, 2, axis=-1).sum(axis=-1)
            drop = mx.argpartition(group_score, self.n_group - self.topk_group - 1, axis=-1)
            drop = drop[..., : self.n_group - self.topk_group]
            g = mx.put_along_axis(g, drop[..., None], mx.array(-mx.inf, g.dtype), axis=-2)
            choice = mx.flatten(g, -2, -1)
        inds = mx.stop_gradient(mx.argpartition(-choice, self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(scores, inds, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return inds, weights * self.scaling


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.experts = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def __call__(self, x: mx.array, residual: mx.array | None = None, norm: nn.RMSNorm | None = None) -> mx.array:
        """The routed experts' weighted sum and the shared expert's output for x normalised by `norm`
        (when given), plus `residual` when given."""
        if x.size == x.shape[-1] and fused_decode(self.experts):
            # one token on a GPU: the router in two launches, then routed and shared experts, the norm
            # and the residual in two more (a shared expert the kernels do not take, LoRA-wrapped, after)
            return self.routed(x, *self.gate(x, norm), residual, norm)
        x = _normed(x, norm)
        return self._summed(x, *self.gate(x), residual)

    def routed(self, x: mx.array, inds: mx.array, weights: mx.array, residual: mx.array | None = None,
               norm: nn.RMSNorm | None = None, mixed=None) -> mx.array:
        """One token's output (fused_decode) given its router's choice: an offloaded bank first makes the
        chosen experts resident (the host reads them) and names their slots. `mixed(x, slots, weights)`:
        what computes on the slots, `self.mixed` with this residual and norm (a layer hands its trace of it)."""
        experts = self.experts
        mixed = mixed or (lambda x, slots, weights: self.mixed(x, slots, weights, residual, norm))
        if _fused_glu(experts) is experts:
            return mixed(x, inds, weights)
        slots = experts.slots_for(_normed(x, norm), inds)
        if slots is None:  # more experts than the bank has slots: it sums them in groups
            return self._summed(_normed(x, norm), inds, weights, residual)
        return mixed(x, slots, weights)

    def mixed(self, x: mx.array, slots: mx.array, weights: mx.array, residual: mx.array | None = None,
              norm: nn.RMSNorm | None = None) -> mx.array:
        """One token's routed experts (in the slots of their stacked weights) and shared expert, the norm and
        the residual in two launches (a shared expert the kernels do not take, LoRA-wrapped, after)."""
        shared = self.shared_experts
        fuse = shared.decodes()
        y = moe_decode(x, _fused_glu(self.experts), slots, weights, shared if fuse else None, residual,
                       norm).astype(x.dtype)
        return y if fuse else y + shared(_normed(x, norm))

    def _summed(self, x: mx.array, inds: mx.array, weights: mx.array, residual: mx.array | None) -> mx.array:
        experts = self.experts
        if getattr(experts, "mixes", False):  # an offloaded bank: the weighted sum is its own op (training)
            y = experts(x, inds, weights) + self.shared_experts(x)
        else:
            y = experts(x, inds)  # [..., k, D]
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2) + self.shared_experts(x)
        return y if residual is None else residual + y


def _normed(x: mx.array, norm: nn.RMSNorm | None) -> mx.array:
    return x if norm is None else norm(x)


def fused_decode(experts) -> bool:
    """Whether a token's routed experts go through the fused kernels: quantized
    stacked experts, resident or an offloaded bank (not LoRA-wrapped), on a GPU."""
    glu = _fused_glu(experts)
    return (type(glu) is SwitchGLU and decode_kernels()
            and all(type(glu[p]) is QuantizedSwitchLinear for p in ("gate_proj", "up_proj", "down_proj")))


def _fused_glu(experts):
    """The SwitchGLU a token's routed experts compute on: theirs, or the one an offloaded bank names."""
    return experts if type(experts) is SwitchGLU else getattr(experts, "fused_glu", experts)


def decode_kernels(*layers) -> bool:
    """Whether one token takes the decode kernels here (on a GPU, FUSED_DECODE on), through these
    layers: plain quantized layers (not LoRA-wrapped)."""
    return FUSED_DECODE and backend() != "cpu" and all(type(layer) is nn.QuantizedLinear for layer in layers)


FUSED_DECODE = True


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, moe: bool):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MoE(args) if moe else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        if x.size == x.shape[-1] and cache is not None and decode_kernels() and self._decodes():
            # one token on a GPU
            project, finish, mixed = self._decode_plan()
            attn, offset = self.self_attn, position(cache.offset)
            if attn.writes_cache(cache):
                shape = (1, attn.n_kv_heads, 1, attn.head_dim)
                keys, values = cache.room(shape, x.dtype)
                after = cache.last_write(shape, x.dtype)
                if attn.attends_in_place(x.dtype):  # the whole layer one trace: no op depends on the length
                    y, keys, values, written = self._cached_step(keys.shape[2])(x, offset, keys, values, after)
                    cache.advance(keys, values, 1, written)
                    return self._experts(y, mixed)
                q, keys, values, written = self._cached_projection(keys.shape[2])(x, offset, keys, values, after)
                cache.advance(keys, values, 1, written)
                k, v = cache.fetch()
            else:
                q, k, v = project(x, offset)
                k, v = cache.update_and_fetch(k, v)
            return self._experts(finish(attend(q, k, v, cache, attn.scale, causal=False), x), mixed)
        h = self.self_attn(x, cache, residual=x, norm=self.input_layernorm)
        return self._mlp_half(h)

    def _decodes(self) -> bool:
        """Whether one token's layer takes the decode plan: its MLP computes on the card alone, or is an
        offloaded bank whose slots the fused kernels take (the plan's halves then stop at the router's
        choice and go on from the slots, with the host's reads between them: _experts)."""
        return not _host_side(self.mlp) or fused_decode(self.mlp["experts"])

    def _experts(self, y, mixed):
        """A decode half's output on: y itself, or, where the host reads the routed experts (an offloaded
        bank), (h, the router's choice) through the bank and the compiled `mixed`."""
        if not _host_side(self.mlp):
            return y
        h, inds, weights = y
        return self.mlp.routed(h, inds, weights, h, self.post_attention_layernorm, mixed)

    def traces_whole(self, cache, dtype) -> bool:
        """Whether one token's layer can be in GLMModel's whole-step trace with a cache like `cache`: its
        q|k|v launch writes the cache and its attention reads it in place (no op depends on the length), and
        no host work mid-layer (an offloaded bank)."""
        attn = self.self_attn
        return not _host_side(self.mlp) and attn.writes_cache(cache) and attn.attends_in_place(dtype)

    # The norms go in with their inputs: one token's kernels apply them as they read x.
    def _project(self, x: mx.array, offset: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return self.self_attn.project(x, offset, self.input_layernorm)

    def _project_cached(self, x: mx.array, offset: mx.array, keys: mx.array, values: mx.array,
                        after: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        return self.self_attn.project_cached(x, offset, keys, values, after, self.input_layernorm)

    def _step_cached(self, x: mx.array, offset: mx.array, keys: mx.array, values: mx.array,
                     after: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        q, keys, values, written = self._project_cached(x, offset, keys, values, after)
        o = decode_attention(q, keys, values, offset, self.self_attn.scale)
        return self._finish(o, x), keys, values, written

    def _finish(self, o: mx.array, x: mx.array):
        h = self.self_attn.output(o, residual=x)
        if _host_side(self.mlp):  # the host must read the router's choice: the half ends there (_experts)
            return h, *self.mlp.gate(h, self.post_attention_layernorm)
        return self._mlp_half(h)

    def _mixed(self, h: mx.array, slots: mx.array, weights: mx.array) -> mx.array:
        return self.mlp.mixed(h, slots, weights, h, self.post_attention_layernorm)

    def _mlp_half(self, h: mx.array) -> mx.array:
        return self.mlp(h, residual=h, norm=self.post_attention_layernorm)

    def _decode_plan(self):
        """One token's layer as two compiled halves around the KV cache: (norm, q|k|v, RoPE; the
        cache write too where the launch makes it) and (o_proj + residual, norm, MLP + residual).
        Their ops are rebuilt from a trace in C++ rather than by Python on every token: a decode
        step is bound by the host (scripts/compile_probe.py).
        A trace holds the weights it saw, so both are traced again whenever any module or array of
        the layer is another one (weights loaded, an adapter applied or fused, a dtype set) or
        FUSED_DECODE changes. With COMPILED_DECODE off, the halves untraced."""
        if not COMPILED_DECODE:
            return self._project, self._finish, self._mixed
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0] != FUSED_DECODE or not plan[1].holds():
            plan = (FUSED_DECODE, _Tree(self), (mx.compile(self._project), mx.compile(self._finish),
                                                mx.compile(self._mixed)))
            object.__setattr__(self, "_plan", plan)  # a plain attribute, not a parameter
        return plan[2]

    def _cached_projection(self, capacity: int):
        """_project_cached compiled for the cache's current capacity (call after _decode_plan). Its
        inputs are the cache's buffers, so each capacity is another trace; kept for all, they would
        pile up as the cache grows (one every KVCache.step positions), each call searching them. So
        only the latest is kept, traced again with the plan or when the capacity changes."""
        return self._traced("_cached", self._project_cached, capacity)

    def _cached_step(self, capacity: int):
        """The whole layer for one token, attention over the buffers in place (_step_cached), compiled as
        _cached_projection is: one trace a layer and capacity."""
        return self._traced("_stepped", self._step_cached, capacity)

    def _traced(self, slot: str, fn, capacity: int):
        return _compiled(self, slot, self.__dict__["_plan"], fn, capacity) if COMPILED_DECODE else fn


def _compiled(owner, slot: str, plan, fn, capacity: int):
    """fn compiled for one capacity of the KV cache's buffers under `plan` (what the owner's traces were
    made for), kept in the owner's `slot`, a plain attribute: only the latest, made again when the plan or
    the capacity changes (kept for every capacity, traces would pile up as the cache grows)."""
    kept = owner.__dict__.get(slot)
    if kept is None or kept[0] is not plan or kept[1] != capacity:
        kept = (plan, capacity, mx.compile(fn))
        object.__setattr__(owner, slot, kept)
    return kept[2]


# One token's q|k|v launch writes k and v into a float KV cache itself (Attention.writes_cache): two ops
# a layer fewer. A switch for scripts/launch_probe.py to measure it against the cache's own writes.
KV_IN_KERNEL = True

# One token's attention through kernels.decode_attention where it fits (CUDA): off with
# GLM_MLX_ATTENTION_KERNEL=0, mx.fast's over slices of the cache then (to measure one against the other).
ATTENTION_IN_KERNEL = os.environ.get("GLM_MLX_ATTENTION_KERNEL", "1") != "0"

# One token through all the layers as one compiled trace (GLMModel._whole_step) where they all fit; off with
# GLM_MLX_WHOLE_STEP=0, a trace a layer then (to measure one against the other).
WHOLE_STEP = os.environ.get("GLM_MLX_WHOLE_STEP", "1") != "0"

# Off with GLM_MLX_COMPILED_DECODE=0: one token's layer runs the same ops, built by Python each time rather
# than replayed from a trace. An escape hatch where a backend mishandles the traces (the Metal kernels
# inside mx.compile were never run here, for want of a Mac).
COMPILED_DECODE = os.environ.get("GLM_MLX_COMPILED_DECODE", "1") != "0"


def _host_side(mlp) -> bool:
    """Whether an MLP's computation needs the host mid-step, which a compiled trace cannot hold:
    its routed experts are an offloaded bank (it reads experts from disk), told apart as MoE's
    fused path tells them (_fused_glu)."""
    experts = mlp.get("experts")
    return experts is not None and _fused_glu(experts) is not experts


class _Tree:
    """What a module holds, to tell cheaply whether it still holds it: every edge from a container
    (module, dict, list, tuple) to an array or container under it, and each container's size. A
    replaced array or module breaks an edge; an added one changes a size. A trace keeps the arrays
    it saw alive, so the snapshot's references cost nothing more. Checked once a layer a token: a
    walk rebuilding the ids took 15 us a layer on the CPU here, this 6 (a decode step is bound by
    the host as much as by the device: BENCHMARKS.md, session 18)."""

    def __init__(self, tree):
        self.edges, self.sizes, stack = [], [], [tree]
        while stack:
            t = stack.pop()
            self.sizes.append((t, len(t)))
            for k, v in t.items() if isinstance(t, dict) else enumerate(t):
                if isinstance(v, (mx.array, dict, list, tuple)):
                    self.edges.append((t, k, v))
                    if not isinstance(v, mx.array):
                        stack.append(v)

    def holds(self) -> bool:
        return all(c[k] is v for c, k, v in self.edges) and all(len(c) == n for c, n in self.sizes)


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


class MTPLayer(nn.Module):
    """GLM's multi-token-prediction layer: predicts token t+2 from the trunk's
    final hidden state at t and the embedding of token t+1."""

    def __init__(self, args: ModelArgs, own_embed: bool = False):
        super().__init__()
        d = args.hidden_size
        if own_embed:  # GLM-4.5 ships a copy of the embedding in its MTP layer
            self.embed_tokens = nn.Embedding(args.vocab_size, d)
        self.enorm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.layer = DecoderLayer(args, moe=True)
        self.shared_head = SharedHead(args)

    def __call__(self, hidden: mx.array, next_tokens: mx.array, trunk_embed: nn.Embedding,
                 cache: KVCache | None = None) -> mx.array:
        """hidden: the trunk's final (normed) hidden states [B, T, D] at t;
        next_tokens: the tokens at t+1 [B, T]. Returns logits for t+2."""
        return self.logits(self.hidden(hidden, next_tokens, trunk_embed, cache))

    def hidden(self, hidden: mx.array, next_tokens: mx.array, trunk_embed: nn.Embedding,
               cache: KVCache | None = None) -> mx.array:
        """The layer's output [B, T, D] before its head (speculative decoding needs logits for one row)."""
        e = (self.embed_tokens if "embed_tokens" in self else trunk_embed)(next_tokens)
        h = self.eh_proj(mx.concatenate([self.enorm(e), self.hnorm(hidden)], axis=-1))
        return self.layer(h, cache)

    def logits(self, h: mx.array) -> mx.array:
        return self.shared_head.head(self.shared_head.norm(h))


class GLMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, args.is_moe_layer(i)) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None, eval_layers: bool = False) -> mx.array:
        """Final normed hidden states. `eval_layers` evaluates each layer before the next
        is built (prefill: a layer's temporaries are freed before the next one's exist)."""
        h = self.embed_tokens(tokens)
        if cache is not None and not eval_layers and h.size == h.shape[-1]:
            out = self._whole_step(h, cache)
            if out is not None:
                return out
        with prefilling() if eval_layers else contextlib.nullcontext():  # a synchronisation a layer anyway
            for i, layer in enumerate(self.layers):
                h = layer(h, cache[i] if cache is not None else None)
                if eval_layers:
                    mx.eval(h)
        return self.norm(h)

    def _whole_step(self, h: mx.array, cache: list) -> mx.array | None:
        """One token h [1, 1, D] through every layer and the final norm as one compiled trace, where every
        layer's token is one (DecoderLayer.traces_whole: attention over the buffers in place) and the caches
        are float KVCaches at one position with buffers of one capacity: the normed hidden states, or None.
        One call a step in place of one a layer: a decode step is bound by the host as much as by the
        device, and each layer's call cost Python some 15-30 us around its trace's replay (BENCHMARKS.md,
        session 24). Traced again as _decode_plan's halves are (what the model holds, the switches), and
        for each capacity of the buffers (_compiled)."""
        # what holds for every layer alike first: no walk of the model's tree where it cannot fit (the CPU, a Mac)
        if (not COMPILED_DECODE or not WHOLE_STEP or len(cache) != len(self.layers) or not decode_kernels()
                or not self.layers[0].self_attn.attends_in_place(h.dtype)):
            return None
        if not all(type(c) is KVCache for c in cache) or any(c.offset != cache[0].offset for c in cache):
            return None
        switches = (KV_IN_KERNEL, ATTENTION_IN_KERNEL, h.dtype)
        plan = self.__dict__.get("_whole")
        if plan is None or plan[0] != switches or not plan[1].holds():
            plan = (switches, _Tree(self), all(layer.traces_whole(cache[0], h.dtype) for layer in self.layers))
            object.__setattr__(self, "_whole", plan)  # a plain attribute, not a parameter
        if not plan[2]:
            return None
        attn = self.layers[0].self_attn
        shape = (1, attn.n_kv_heads, 1, attn.head_dim)
        rooms = [c.room(shape, h.dtype) for c in cache]
        capacity = rooms[0][0].shape[2]
        if any(k.shape[2] != capacity for k, _ in rooms):
            return None
        step = _compiled(self, "_whole_traced", plan, self._layers_step, capacity)
        out, keys, values, written = step(h, position(cache[0].offset), [k for k, _ in rooms], [v for _, v in rooms],
                                          [c.last_write(shape, h.dtype) for c in cache])
        for c, k, v, w in zip(cache, keys, values, written):
            c.advance(k, v, 1, w)
        return out

    def _layers_step(self, h: mx.array, offset: mx.array, keys: list, values: list, afters: list):
        ks, vs, ws = [], [], []
        for layer, k, v, a in zip(self.layers, keys, values, afters):
            h, k, v, w = layer._step_cached(h, offset, k, v, a)
            ks.append(k)
            vs.append(v)
            ws.append(w)
        return self.norm(h), ks, vs, ws


class Model(nn.Module):
    def __init__(self, args: ModelArgs, mtp_own_embed: bool = False):
        super().__init__()
        self.args = args
        self.model = GLMModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mtp = [MTPLayer(args, mtp_own_embed) for _ in range(args.num_nextn_predict_layers)]

    def __call__(self, tokens, cache: list[KVCache] | None = None, *, checked: bool = False) -> mx.array:
        """Logits [B, T, vocab] for int tokens [B, T]. Token ids are checked
        against the vocabulary first (an id past it crashes MLX's CPU
        embedding); `checked=True` skips that for ids the caller sampled."""
        if not checked:
            tokens = validate_tokens(tokens, self.args.vocab_size)
        return self.logits(self.model(tokens, cache))

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        if hidden.size == hidden.shape[-1] and decode_kernels(self.lm_head):  # one token on a GPU
            return linear_decode(hidden, self.lm_head)
        return self.lm_head(hidden)

    def make_cache(self, kv_bits: int | None = None, mtp: bool = False) -> list:
        """One cache per layer; kv_bits 8 or 4 quantizes keys and values (long contexts). `mtp`: one more,
        last, for the MTP layer (speculative decoding: generate.generate_tokens takes it from there)."""
        if mtp and not self.mtp:
            raise ValueError("this model has no MTP layer (num_nextn_predict_layers is 0): it cannot draft tokens")
        return make_caches(len(self.model.layers) + bool(mtp), self.args.head_dim, kv_bits)


def validate_tokens(tokens, vocab_size: int) -> mx.array:
    """Int tokens [B, T] as an mx.array, or a ValueError naming the bad id."""
    if isinstance(tokens, mx.array):
        if tokens.ndim != 2 or not mx.issubdtype(tokens.dtype, mx.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype}{tokens.shape}")
        lo, hi = mx.min(tokens).item(), mx.max(tokens).item()
    else:
        arr = np.asarray(tokens)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {arr.dtype}{arr.shape}")
        lo, hi = int(arr.min()), int(arr.max())
        tokens = mx.array(arr.astype(np.int32))
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return tokens
