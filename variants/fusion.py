"""One GEMM for projections that read the same input (q/k/v; gate/up), as gpt-fast's wqkv and w1/w3 do.

Decoding at small batch reads every weight once per token; separate projections are separate kernels (each
with its own launch and tail), fused they are one read of one contiguous weight. A part lists its groups in
`fusable_projections` and calls `self.project(name, x)` where it would call the Linears one by one:

    class Attention(FusedProjections, nn.Module):
        fusable_projections = {"qkv": ("q_proj", "k_proj", "v_proj")}
        ...
        q, k, v = self.project("qkv", x)

`fuse_projections()` (TransformerLM.fuse_projections() calls it on every part that has it) concatenates each
group's weights into one buffer and points the Linears' weights at slices of it: the same Parameter objects,
the same state_dict, the same memory; training and optimizers see nothing change. The fused buffer is read in
eval mode only, and only while the Linears still share the buffer's storage: a dtype or device move re-fuses
(`_apply`), anything else that replaces a weight makes `project` fall back to the separate Linears.

In training a group runs as one GEMM too, over its weights concatenated afresh each call (nanoGPT's c_attn):
one matmul forward and two backward instead of one and two per projection, and one gradient for the shared
input instead of a sum of three; the concatenation is a copy of the weights, small beside the matmuls.
Linears with hooks (telemetry, a user's wrapper) or sharded weights run one by one, as they are.
"""
import torch
import torch.nn.functional as F
from torch import nn


class FusedProjections:
    """Mixin for an nn.Module whose `fusable_projections` maps a group name to Linear attribute names."""

    fusable_projections: dict[str, tuple[str, ...]] = {}

    def fuse_projections(self) -> int:
        """Fuse every group whose Linears agree on dtype, device and having a bias; returns how many."""
        fused = 0
        for name, parts in self.fusable_projections.items():
            linears = [getattr(self, p) for p in parts]
            first = linears[0].weight
            if any(not isinstance(m, nn.Linear) or m.weight.dtype != first.dtype or m.weight.device != first.device
                   or (m.bias is None) != (linears[0].bias is None) or m.weight.is_meta
                   or type(m.weight.data) is not torch.Tensor for m in linears):  # not DTensors (FSDP2's shards)
                continue
            for kind in ("weight", "bias"):
                if linears[0].bias is None and kind == "bias":
                    self.register_buffer(f"fused_{name}_bias", None, persistent=False)
                    continue
                with torch.no_grad():
                    whole = torch.cat([getattr(m, kind).detach() for m in linears])
                for m, part in zip(linears, whole.split([m.out_features for m in linears])):
                    getattr(m, kind).data = part  # the same Parameter, now a slice of the fused tensor
                # a buffer (not a plain attribute): moved with the module, and static to CUDA graphs
                self.register_buffer(f"fused_{name}_{kind}", whole, persistent=False)
            fused += 1
        return fused

    def project(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The group's projections of x, in `fusable_projections` order: one GEMM when fused (eval mode)."""
        parts = self.fusable_projections[name]
        weight = getattr(self, f"fused_{name}_weight", None)
        if weight is not None and not self.training and self._shares(name, weight):
            out = F.linear(x, weight, getattr(self, f"fused_{name}_bias"))
            return out.split([getattr(self, p).out_features for p in parts], dim=-1)
        linears = [getattr(self, p) for p in parts]
        if self.training and _concatenable(linears):
            weight = torch.cat([m.weight for m in linears])
            bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
            return F.linear(x, weight, bias).split([m.out_features for m in linears], dim=-1)
        return tuple(m(x) for m in linears)

    def _shares(self, name: str, weight: torch.Tensor) -> bool:
        first = getattr(self, self.fusable_projections[name][0]).weight
        if first.dtype != weight.dtype or first.device != weight.device:
            return False
        # storage identity is a host-side fact a compiled graph cannot check; dtype and device are guarded
        return torch.compiler.is_compiling() or first.data_ptr() == weight.data_ptr()

    def _apply(self, fn, recurse=True):
        # .to(dtype/device) converts the Linears' weights and the fused buffer apart: two copies. Fuse again.
        out = super()._apply(fn, recurse)
        if any(getattr(self, f"fused_{name}_weight", None) is not None for name in self.fusable_projections):
            self.fuse_projections()
        return out


def _concatenable(linears) -> bool:
    """Plain Linears without hooks, on one dtype and device, all with or all without a bias, plain tensors."""
    first = linears[0].weight
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
               and m.weight.dtype == first.dtype and m.weight.device == first.device
               and (m.bias is None) == (linears[0].bias is None) and type(m.weight.data) is torch.Tensor
               for m in linears) and not _global_module_hooks()


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as module_mod
    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)
