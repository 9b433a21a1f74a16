"""Writing the generated files: YAML through PyYAML, each file reported once written."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

import embedfleet

PACKAGE = Path(__file__).parent
DOCKERFILES = {"cpu": PACKAGE / "docker" / "Dockerfile.cpu", "cuda": PACKAGE / "docker" / "Dockerfile.cuda"}
DASHBOARD = PACKAGE / "grafana" / "embedfleet-dashboard.json"


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order given, multi-line strings as literal blocks, no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(*documents: Any) -> str:
    """One or several YAML documents."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def to_json(data: Any) -> str:
    """Indented JSON."""
    return json.dumps(data, indent=2) + "\n"


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard shipped in the package."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def source_root() -> Path | None:
    """The source checkout this embedfleet runs from (the images' build context), if it runs from one."""
    root = Path(embedfleet.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "embedfleet").is_dir() else None


def write(out: Path, files: Mapping[str, str], secret: frozenset[str] = frozenset()) -> list[Path]:
    """Write ``files`` (paths relative to ``out``); those in ``secret`` readable by the owner only."""
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in secret:
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def dockerfiles() -> dict[str, str]:
    """The Dockerfiles, to ship beside the generated files."""
    return {f"docker/{p.name}": p.read_text(encoding="utf-8") for p in DOCKERFILES.values()}
