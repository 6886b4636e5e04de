# Sourced by the scripts here, from the repository root: the carried wheels (.whl: optuna, rich and
# nvidia-cudnn-frontend, which the GPU machine lacks) installed into /tmp/site and put on PYTHONPATH
# with src, the carried h100 data (.data/gpu/h100, train.bin as .xz) unpacked into $DATA, and
# $OUTDIR made.
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$(pwd)/src PYTHONUNBUFFERED=1
DATA=/tmp/h100_data
mkdir -p "$DATA" "$OUTDIR"
cp .data/gpu/h100/* "$DATA/"
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('$DATA/train.bin.xz'), open('$DATA/train.bin', 'wb'))"
rm "$DATA/train.bin.xz"
