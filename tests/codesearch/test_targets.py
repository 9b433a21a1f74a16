"""What ``codesearch index`` takes as its target: a folder, or a git URL (cloned by git itself)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from embedfleet.codesearch.errors import CodeSearchError
from embedfleet.codesearch.index import clone, is_git_url, repo_name_of


def test_urls_and_names(tmp_path: Path) -> None:
    assert is_git_url("https://example.invalid/org/tool.git") and is_git_url("git@example.invalid:org/tool.git")
    assert is_git_url("ssh://git@example.invalid/org/tool") and not is_git_url(str(tmp_path))
    assert not is_git_url("relative/folder")
    assert repo_name_of("https://example.invalid/org/tool.git") == "tool"
    assert repo_name_of("git@example.invalid:org/tool.git") == "tool" and repo_name_of("/src/project/") == "project"


def test_clone_of_a_local_repository_and_git_errors(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "a.py").write_text("def a():\n    return 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(origin)]
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    dest = clone(f"file://{origin}", tmp_path / "clones" / "origin")
    assert (dest / "a.py").read_text().startswith("def a()")
    assert clone(f"file://{origin}", dest) == dest  # already cloned: updated in place
    with pytest.raises(CodeSearchError, match="git could not fetch"):
        clone(f"file://{tmp_path / 'missing'}", tmp_path / "clones" / "missing")
