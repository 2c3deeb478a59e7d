#!/usr/bin/env bash
# The package as users get it: build the sdist and the wheel, `twine check` their metadata, and check that the
# wheel ships py.typed and the console script, carries the version deformjax.__version__ declares and no
# unverified project address, and packages nothing but deformjax.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import build, twine' 2>/dev/null || python3 -m pip install --quiet "build>=1.2" "twine>=6.1"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
python3 -m build --outdir "$out" . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python3 -m twine check --strict "$out"/*.whl "$out"/*.tar.gz
python3 - "$out" <<'PY'
import ast, glob, pathlib, sys, zipfile

out = sys.argv[1]
(wheel,) = glob.glob(f'{out}/*.whl')
(sdist,) = glob.glob(f'{out}/*.tar.gz')
names = zipfile.ZipFile(wheel).namelist()
init = pathlib.Path('deformjax/__init__.py').read_text()
version = next(n.value.value for n in ast.parse(init).body
               if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == '__version__')
problems = []
if 'deformjax/py.typed' not in names:
  problems.append('the wheel has no deformjax/py.typed')
if not pathlib.Path(wheel).name.startswith(f'deformjax-{version}-'):
  problems.append(f'the wheel {pathlib.Path(wheel).name} does not carry deformjax.__version__ = {version}')
wheel_zip = zipfile.ZipFile(wheel)
entry_points = next((wheel_zip.read(n).decode() for n in names if n.endswith('.dist-info/entry_points.txt')), '')
if 'deformjax-train = deformjax.train.cli:run' not in entry_points:
  problems.append('the wheel does not declare the deformjax-train console script')
metadata = next(wheel_zip.read(n).decode() for n in names if n.endswith('.dist-info/METADATA'))
# The project has no verified public home yet: the metadata must not claim one.
if 'Project-URL' in metadata or 'Home-page' in metadata:
  problems.append("the wheel's metadata names a project address, and none is verified")
strays = sorted({n.split('/')[0] for n in names if not n.startswith(('deformjax/', 'deformjax-'))})
if strays:
  problems.append(f'the wheel packages more than deformjax: {strays}')
if problems:
  sys.exit('build.sh: ' + '; '.join(problems))
print(f'build.sh: {pathlib.Path(sdist).name} and {pathlib.Path(wheel).name} ({len(names)} files, py.typed) pass twine check')
PY
