"""Small source files in several languages, shared by the code-search tests."""

from __future__ import annotations

from pathlib import Path

PYTHON = '''"""Payment helpers."""

import math

RATE = 0.2


# Rounds half up, as accountants do.
def round_cents(amount: float) -> float:
    return math.floor(amount * 100 + 0.5) / 100


@dataclass
class Invoice:
    """An invoice with lines."""

    currency = "EUR"

    def total(self) -> float:
        return sum(self.lines)

    @property
    def tax(self) -> float:
        return self.total() * RATE
'''

JAVASCRIPT = '''import fs from "fs";

export function parseConfig(text) {
  return JSON.parse(text);
}

const retryWithBackoff = async (fn, attempts) => {
  for (let i = 0; i < attempts; i++) {
    try { return await fn(); } catch (e) { await sleep(2 ** i); }
  }
};

class Cache {
  constructor() { this.map = new Map(); }
  get(key) { return this.map.get(key); }
}
'''

TYPESCRIPT = '''export interface User {
  id: number;
  name: string;
}

export type Id = string | number;

export class UserService {
  private users: User[] = [];

  findByName(name: string): User | undefined {
    return this.users.find((u) => u.name === name);
  }
}

export const greet = (user: User): string => `hello ${user.name}`;
'''

GO = '''package server

import "net/http"

// Server answers HTTP requests.
type Server struct {
	mux *http.ServeMux
}

// Handle registers a route.
func (s *Server) Handle(path string, h http.Handler) {
	s.mux.Handle(path, h)
}

func NewServer() *Server {
	return &Server{mux: http.NewServeMux()}
}
'''

RUST = '''use std::collections::HashMap;

/// A word counter.
pub struct Counter {
    counts: HashMap<String, usize>,
}

impl Counter {
    pub fn new() -> Self {
        Counter { counts: HashMap::new() }
    }

    pub fn add(&mut self, word: &str) {
        *self.counts.entry(word.to_string()).or_insert(0) += 1;
    }
}

pub fn tokenize(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}
'''

MARKDOWN = "\n".join(f"Line {i} of the guide." for i in range(1, 101)) + "\n"


def write_repo(root: Path) -> Path:
    """A small repository with a file per language, ignored files and a vendored folder."""
    files = {"billing/payments.py": PYTHON, "web/config.js": JAVASCRIPT, "web/users.ts": TYPESCRIPT,
             "server/server.go": GO, "counter/src/lib.rs": RUST, "docs/guide.md": MARKDOWN}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root
