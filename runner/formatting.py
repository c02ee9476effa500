"""How every printed table and report writes bytes and dtypes: one rule, one place."""


def format_bytes(n) -> str:
    """1536 -> '1.5 KiB'; None -> '-'. Binary units, as allocators and nvidia-smi count."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def dtype_name(dtype) -> str | None:
    """torch.bfloat16 -> 'bfloat16' (None stays None)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")
