# Source from the repo root on the GPU machine, where `pip install -e .` is not possible (no network, no build
# deps): makes `import wina` resolve to this checkout through PYTHONPATH, with the same package layout as
# pyproject.toml's package-dir (wina/ plus runtime/, calibration/, convert/ as wina.runtime, ...).
# Wheels carried in .carry/*.whl (e.g. gguf, absent there) are installed into /tmp/site first.
_wina_root=$(pwd)
_wina_path=/tmp/wina_path
rm -rf "$_wina_path" && mkdir -p "$_wina_path/wina"
cp -r "$_wina_root"/wina/. "$_wina_path/wina/"
for _d in runtime calibration convert; do ln -s "$_wina_root/$_d" "$_wina_path/wina/$_d"; done
if ls "$_wina_root"/.carry/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$_wina_root"/.carry/*.whl
fi
export PYTHONPATH="$_wina_path:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
