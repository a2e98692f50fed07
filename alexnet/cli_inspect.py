"""`ablate config` (the resolved run config of a cell, as Hydra's ``--cfg job`` prints it)
and `ablate cache` (where decoded data is kept outside the working directory, and how
much)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from alexnet.cli_common import (
    DataRoot,
    Dataset,
    Device,
    Epochs,
    Quick,
    SetItems,
    command_overrides,
    console,
    user_errors,
)


@user_errors
def config(
    name: Annotated[str, typer.Argument(help="Ablation name or path to a .yaml file.")],
    arm: Annotated[list[str] | None, typer.Option(
        help="activation=tanh, or just tanh; repeatable (default: the reference arm).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="The cell's seed (default: the "
                                                         "ablation's first).")] = None,
    quick: Quick = False,
    epochs: Epochs = None,
    dataset: Dataset = None,
    data_root: DataRoot = None,
    device: Device = None,
    set_: SetItems = None,
) -> None:
    """Print the resolved run config of a cell as YAML, with its cell and grid keys.

    What `ablate run` with the same flags trains: profile < base < --quick < arm < flags.
    """
    import yaml

    from alexnet.ablation import load_ablation, select_arms

    ab = load_ablation(name)
    overrides = command_overrides(epochs, dataset, data_root, device, set_)
    cells = ab.cells(quick=quick, seeds=None if seed is None else [seed], overrides=overrides)
    if arm:
        chosen = select_arms(cells, arm)
    else:
        reference = [c for c in cells if all(ab.members()[0].reference.get(a) == v
                                              for a, v in c.arms.items())]
        chosen = (reference or cells)[:1]
    for i, cell in enumerate(chosen):
        others = sorted({c.arm_label for c in cells} - {c.arm_label for c in chosen})
        head = [f"# {cell.ablation} · {cell.arm_label} · seed {cell.seed}",
                f"# cell {cell.key} · grid {cell.grid_key}"]
        if others and not arm:
            head.append(f"# other arms (--arm): {', '.join(others)}")
        text = yaml.safe_dump(cell.config.model_dump(mode="json"), sort_keys=False)
        typer.echo(("---\n" if i else "") + "\n".join(head) + "\n" + text, nl=False)


cache = typer.Typer(
    no_args_is_help=True,
    help="Where decoded data is kept, outside the working directory, and how big (info); "
         "delete it (clear).\n\nImage folders and CIFAR are decoded once into tensors there, "
         "and CIFAR is downloaded there without --data-root. Default: "
         "~/.cache/alexnet-ablate; $ALEXNET_CACHE or --set data.cache_dir=... moves it.")

# What the cache folder holds, by name: the only files `cache clear` removes.
_OURS = ("*.pt", "*.pt.lock", ".*.tmp")
_DOWNLOADS = "cifar"


def cache_folder() -> Path:
    from alexnet.config import DataConfig
    from alexnet.data.cache import cache_dir

    return cache_dir(DataConfig())


def cache_entries(folder: Path) -> list[tuple[Path, int]]:
    """(path, bytes) of what ablate put in ``folder``; anything else there is not ours."""
    if not folder.is_dir():
        return []
    found = {p for pattern in _OURS for p in folder.glob(pattern) if p.is_file()}
    entries = [(p, p.stat().st_size) for p in sorted(found)]
    downloads = folder / _DOWNLOADS
    if downloads.is_dir():
        entries.append((downloads, sum(f.stat().st_size for f in downloads.rglob("*")
                                       if f.is_file())))
    return entries


def what_it_is(path: Path) -> str:
    name = path.name
    if path.is_dir():
        return "CIFAR archives, downloaded"
    if name.endswith(".lock"):
        return "lock"
    if name.endswith(".tmp"):
        return "partial write (a killed process)"
    if ".stats-" in name or ".stream-stats-" in name:
        return "pixel statistics"
    if name.endswith(".test.pt"):
        return f"{name.split('-')[0]} test split, decoded"
    return f"{name.split('-')[0]} images, decoded"


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@cache.command("info")
@user_errors
def cache_info() -> None:
    """Where the cache is, what it holds and how big it is."""
    from rich.table import Table

    folder = cache_folder()
    entries = cache_entries(folder)
    total = sum(size for _, size in entries)
    console.print(f"cache: {folder} ({size_text(total)}; $ALEXNET_CACHE moves it)",
                  highlight=False)
    if not entries:
        console.print("empty" if folder.exists() else "not created yet")
        return
    table = Table("file", "what", "size", "modified", box=None, pad_edge=False)
    for path, size in entries:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        table.add_row(path.name, what_it_is(path), size_text(size), stamp)
    console.print(table)


@cache.command("clear")
@user_errors
def cache_clear(
    downloads: Annotated[bool, typer.Option(
        "--downloads", help="Also the CIFAR archives downloaded there.")] = False,
) -> None:
    """Delete the decoded data; the next run that needs it decodes it again.

    Only ablate's own files go; anything else in the folder is left alone.
    """
    folder = cache_folder()
    freed = 0
    for path, size in cache_entries(folder):
        if path.is_dir():
            if not downloads:
                continue
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        freed += size
    console.print(f"freed {size_text(freed)} in {folder}", highlight=False)
