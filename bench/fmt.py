"""Cell formatting for the markdown tables of RESULTS.md: MB, plain numbers, ratios, and the table itself."""

from __future__ import annotations


def mb(n: float | None, digits: int = 3) -> str:
    return "—" if n is None else f"{n / 1e6:.{digits}f}"


def num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def times(v: float | None) -> str:
    return "—" if v is None else (f"{v:.1f}×" if v >= 0.995 else f"{v:.2f}×")


def table(head: list[str], rows: list[list[str]], align: str) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *["| " + " | ".join(r) + " |" for r in rows], ""]
