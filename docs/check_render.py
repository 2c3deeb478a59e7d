"""Serves the built documentation on 127.0.0.1 and checks in headless Chromium that pages render.

Run after ``bash docs/build.sh``::

  python docs/check_render.py                  # checks, screenshots in docs/_build/screenshots/
  python docs/check_render.py --out /tmp/shots

What a page must show once its scripts have run (the DOM Chromium dumps):

- the home page: the project's title and its navigation to the API reference;
- the API reference of ``deformjax.ops``: an entry for every name in ``deformjax.ops.__all__``;
- the op-tour notebook: its title and at least one stored output rendered, an image among them.

Each page is also saved as a PNG screenshot to look at. Without Chromium (Debian's package
``chromium``) the check is skipped with a message and exit status 0; a page that does not
render fails it with status 1.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
CHROMIUM_NAMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
# Headless, no network beyond 127.0.0.1, nothing remembered between runs.
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--hide-scrollbars', '--window-size=1280,1600', '--virtual-time-budget=4000')
PAGE_TIMEOUT_S = 60


@dataclass
class Page:
  """A page of the site, the strings its rendered DOM must contain, and the patterns it must match."""
  path: str
  contains: list[str] = field(default_factory=list)
  matches: list[str] = field(default_factory=list)


def pages() -> list[Page]:
  sys.path.insert(0, str(ROOT))
  import deformjax.ops

  ops_ids = [f'id="deformjax.ops.{name}"' for name in deformjax.ops.__all__]
  return [
      Page('index.html', contains=['deformjax', 'API reference', 'Getting started']),
      Page('api/deformjax.ops.html', contains=['deformjax.ops', *ops_ids]),
      # A stored output: myst-nb's output container holding an image (a matplotlib figure).
      Page('notebooks/01_op_tour.html', contains=['A tour of'],
           matches=[r'class="cell_output[^"]*"', r'<img[^>]+src="[^"]+\.png"']),
  ]


def find_chromium() -> str | None:
  for name in CHROMIUM_NAMES:
    if path := shutil.which(name):
      return path
  return None


def serve(directory: pathlib.Path) -> tuple[http.server.ThreadingHTTPServer, str]:
  """An HTTP server on a free port of 127.0.0.1 serving `directory`, running in a thread."""
  handler = functools.partial(_QuietHandler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f'http://127.0.0.1:{server.server_address[1]}/'


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format, *args):  # noqa: A002 (the base class's name)
    pass


def chromium(binary: str, profile: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([binary, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', *args],
                        capture_output=True, text=True, timeout=PAGE_TIMEOUT_S, check=False)


def check_page(binary: str, base: str, page: Page, shots: pathlib.Path) -> list[str]:
  """Problems found on `page` (empty when it rendered as expected); saves its screenshot."""
  url = base + page.path
  try:
    with tempfile.TemporaryDirectory(prefix='deformjax-chromium-') as profile:
      dom = chromium(binary, profile, '--dump-dom', url)
  except subprocess.TimeoutExpired:
    return [f'{page.path}: chromium did not finish loading {url} in {PAGE_TIMEOUT_S} s']
  if dom.returncode != 0 or not dom.stdout.strip():
    return [f'{page.path}: chromium could not load {url} (exit {dom.returncode}): {dom.stderr.strip()[-300:]}']
  problems = [f'{page.path}: the rendered page lacks {text!r}' for text in page.contains if text not in dom.stdout]
  problems += [f'{page.path}: the rendered page matches no {pattern!r}' for pattern in page.matches
               if not re.search(pattern, dom.stdout)]
  shot = shots / (page.path.replace('/', '_').removesuffix('.html') + '.png')
  shot.unlink(missing_ok=True)  # a screenshot of an earlier run proves nothing
  try:
    with tempfile.TemporaryDirectory(prefix='deformjax-chromium-') as profile:
      chromium(binary, profile, f'--screenshot={shot}', url)
  except subprocess.TimeoutExpired:
    pass  # reported below: no screenshot
  if not shot.exists():
    problems.append(f'{page.path}: no screenshot was written')
  return problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--html', type=pathlib.Path, default=DOCS / '_build' / 'html', help='the built site')
  parser.add_argument('--out', type=pathlib.Path, default=DOCS / '_build' / 'screenshots', help='PNG screenshots')
  args = parser.parse_args(argv)
  binary = find_chromium()
  if binary is None:
    print('check_render: SKIPPED, no Chromium found (install Debian\'s package: apt-get install chromium)')
    return 0
  if not (args.html / 'index.html').exists():
    print(f'check_render: no built site in {args.html}; run bash docs/build.sh first', file=sys.stderr)
    return 1
  args.out.mkdir(parents=True, exist_ok=True)
  server, base = serve(args.html)
  try:
    problems = []
    for page in pages():
      found = check_page(binary, base, page, args.out)
      print(f'check_render: {page.path}: {"ok" if not found else "FAILED"}')
      problems += found
  finally:
    server.shutdown()
  for problem in problems:
    print(f'check_render: {problem}', file=sys.stderr)
  print(f'check_render: screenshots in {args.out}')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
