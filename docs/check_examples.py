"""Runs the Python examples of the user guide, so that a page never shows code that fails.

Every fenced ``python`` block of ``docs/*.md`` and ``README.md`` runs, top to bottom,
in one namespace per page, the way a reader pastes them one after the other. A block that
needs what a page cannot provide (a trained model, a PyTorch checkpoint) is preceded by a
comment saying so, which the page does not render::

  <!-- not run: needs a PyTorch state dict -->

  python docs/check_examples.py                  # every page; status 1 if a block fails
  python docs/check_examples.py docs/ops.md
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time
import traceback

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# A fenced python block, optionally preceded (blank lines between allowed) by a not-run comment.
BLOCK = re.compile(r'(?:<!--\s*not run:(?P<why>[^>]*)-->\s*\n)?^```python[^\n]*\n(?P<code>.*?)^```\s*$',
                   re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[tuple[int, str, str | None]]:
  """(line, code, reason not run or None) of every python block of a markdown text.

  Example:
    >>> page = 'Intro.\\n\\n```python\\nx = 1\\n```\\n\\n<!-- not run: needs torch -->\\n```python\\nimport torch\\n```\\n'
    >>> [(line, code, why) for line, code, why in blocks(page)]
    [(3, 'x = 1\\n', None), (8, 'import torch\\n', 'needs torch')]
  """
  found = []
  for m in BLOCK.finditer(text):
    line = text.count('\n', 0, m.start('code'))
    found.append((line, m.group('code'), m.group('why').strip() if m.group('why') is not None else None))
  return found


def run_page(path: pathlib.Path) -> list[str]:
  """Problems found running the page's blocks (empty when every runnable block ran).

  The blocks run in a temporary working directory: files an example writes (an exported model,
  a plot) do not land in the checkout.
  """
  namespace: dict = {'__name__': f'docs_example_{path.stem}'}
  problems = []
  cwd = os.getcwd()
  with tempfile.TemporaryDirectory(prefix='deformjax-example-') as scratch:
    os.chdir(scratch)
    try:
      for line, code, why in blocks(path.read_text()):
        if why is not None:
          continue
        try:
          exec(compile(code, f'{path.name}:{line}', 'exec'), namespace)
        except Exception:  # noqa: BLE001 (any failure of an example is the finding)
          problems.append(f'{path.relative_to(ROOT)}, block at line {line}:\n{traceback.format_exc(limit=-3)}')
          break  # later blocks of the page build on this one
    finally:
      os.chdir(cwd)
  return problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('pages', nargs='*', type=pathlib.Path,
                      default=[*sorted(DOCS.glob('*.md')), ROOT / 'README.md'], help='default: docs/*.md, README.md')
  args = parser.parse_args(argv)
  sys.path.insert(0, str(ROOT))
  import jax

  jax.config.update('jax_platforms', 'cpu')
  problems, ran = [], 0
  for page in args.pages:
    page = page.resolve()
    found = blocks(page.read_text())
    if not found:
      continue
    start = time.perf_counter()
    page_problems = run_page(page)
    problems += page_problems
    ran += sum(why is None for _, _, why in found)
    status = 'FAILED' if page_problems else 'ok'
    skipped = sum(why is not None for _, _, why in found)
    print(f'check_examples: {page.relative_to(ROOT)}: {status} ({len(found) - skipped} run, {skipped} not run, '
          f'{time.perf_counter() - start:.1f} s)')
  for problem in problems:
    print(f'check_examples: {problem}', file=sys.stderr)
  print(f'check_examples: {ran} blocks run, {len(problems)} failed')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
