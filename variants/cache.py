"""A static, preallocated KV cache (as in gpt-fast): one buffer per layer sized for the whole
generation, written in place, so decoding allocates nothing and its memory is known up front."""
import torch


class KVCache:
    """Keys and values for every layer: (n_layers, B, n_kv_heads, max_len, head_dim) each, plus the
    document id and position of every cached token (so packed or padded prompts keep their masks).

    Bytes per cached token = 2 (K and V) x n_layers x n_kv_heads x head_dim x bytes per element.
    An attention module that caches something else (MLA: a latent and a shared rotary key) describes it
    with `layout`, name -> (heads, dim) per token; the buffers follow it, in its order.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu", layout: dict | None = None):
        layout = layout or {"k": (n_kv_heads, head_dim), "v": (n_kv_heads, head_dim)}
        self.buffers = {name: torch.zeros((n_layers, batch_size, heads, max_len, dim), dtype=dtype, device=device)
                        for name, (heads, dim) in layout.items()}
        self.document_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len, self.length = max_len, 0
        # True once a call gave document ids (packed or padded prompts): later calls without ids then continue
        # the last document; False: one plain sequence, whose decoding steps need no document mask at all
        self.has_documents = False
        self.owner = None  # the runner.decode.Decoder that last prefilled this cache, where one shares it

    @property
    def k(self):
        return self.buffers["k"]

    @property
    def v(self):
        return self.buffers["v"]

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype=torch.float32) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def layout_bytes_per_token(n_layers: int, layout: dict, dtype=torch.float32) -> int:
        per_layer = sum(heads * dim for heads, dim in layout.values())
        return n_layers * per_layer * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value buffers actually allocated (document/position ids excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def reset(self):
        self.length, self.has_documents = 0, False

    def layer(self, index: int, slots=None) -> "LayerCache":
        return LayerCache(self, index, slots)

    @property
    def device(self):
        return self.document_ids.device

    def write(self, index: int, *tensors):
        """Store this call's tensors (B, heads, T, dim), one per layout entry; return each with all cached."""
        start, end = self.length, self.length + tensors[0].shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this call needs {end}")
        out = []
        for buffer, t in zip(self.buffers.values(), tensors):
            buffer[index, :, :, start:end] = t
            out.append(buffer[index, :, :, :end])
        return tuple(out)

    # -- fixed shapes (compiled decoding, runner/decode.py): slots are a tensor, nothing is sliced ----------
    def write_at(self, index: int, slots, *tensors):
        """Store this call's tensors (B, heads, T, dim) at cache slots `slots` (T,) and return the whole
        buffers (B, heads, max_len, dim): the same shapes at every call, so a compiled step never recompiles."""
        out = []
        for buffer, t in zip(self.buffers.values(), tensors):
            buffer[index].index_copy_(2, slots, t.to(buffer.dtype))
            out.append(buffer[index])
        return tuple(out)

    def record_at(self, slots, document_ids, position_ids):
        """The ids (B, T) of the tokens about to be written at `slots`, recorded before the layers attend."""
        self.has_documents = True
        self.document_ids.index_copy_(1, slots, document_ids)
        self.position_ids.index_copy_(1, slots, position_ids)

    def mark_static(self):
        """Tell torch.compile the buffers keep their addresses (CUDA graphs then write them in place)."""
        for t in (*self.buffers.values(), self.document_ids, self.position_ids):
            # no guard on the address (torch <= 2.9's default): a new cache must not recompile the step
            torch._dynamo.mark_static_address(t, guard=False)

    def advance(self, document_ids, position_ids, documented: bool = True):
        """Record the ids of the tokens just written by every layer and move the write position on;
        `documented`: the call's document ids were given (or continued), not zeros standing in for none."""
        self.has_documents = self.has_documents or documented
        T = document_ids.shape[1]
        self.document_ids[:, self.length:self.length + T] = document_ids
        self.position_ids[:, self.length:self.length + T] = position_ids
        self.length += T


class LayerCache:
    """One layer's view of a KVCache, handed to its attention module."""

    def __init__(self, cache: KVCache, index: int, slots=None):
        self.cache, self.index, self.slots = cache, index, slots

    def update(self, *tensors):
        """This call's tensors in, every cached token's out (with `slots`: the whole buffers, masked later)."""
        if self.slots is not None:
            return self.cache.write_at(self.index, self.slots, *tensors)
        return self.cache.write(self.index, *tensors)
