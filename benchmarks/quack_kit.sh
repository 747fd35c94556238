#!/usr/bin/env bash
# quack-kernels and CUTLASS's Python DSL (cu13) for the lent GPU, in two parts: its library wheel is 92 MB and a
# device call carries 64 MiB in all. Run here from the project root (it needs the package registry); writes
# .devquack/p1 and .devquack/p2 (git-ignored) and prints the two calls, made back to back, before the benchmark's.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
rm -rf "$root/.devquack" && mkdir -p "$root/.devquack/whl" "$root/.devquack/p1" "$root/.devquack/p2"
cd "$root/.devquack/whl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any \
  quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  apache-tvm-ffi torch-c-dlpack-ext einops 2>&1 | grep -v '^WARNING: Location' || true
big=$(ls nvidia_cutlass_dsl_libs_cu13-*.whl)
split -n 2 -d "$big" "$root/.devquack/p2/$big.part"
mv "$root/.devquack/p2/$big.part00" "$root/.devquack/p1/"
mv $(ls *.whl | grep -v "^$big$") "$root/.devquack/p1/"
rm -rf "$root/.devquack/whl"
du -sh "$root"/.devquack/p*
cat <<MSG
On the device, back to back (the second joins the library wheel and installs all of it into /tmp/quack):
  run(carry=[".devquack/p1"], command="mkdir -p /root/quack && cp .devquack/p1/* /root/quack/")
  run(carry=[".devquack/p2"], command="cp .devquack/p2/* /root/quack/ && cd /root/quack && cat $big.part0* > $big && rm $big.part0* && python3 -m pip install -q --no-deps --no-index --target /tmp/quack *.whl && ls /tmp/quack")
then the benchmark's call carries .devkit with PYTHONPATH=/tmp/kit:/tmp/quack:\$PWD/lib, e.g.
  python benchmarks/run.py fp8_kernels --quack --out \$OUT
MSG
