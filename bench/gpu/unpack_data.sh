# Sourced by the scripts here: the carried h100 data (.data/gpu/h100, train.bin as .xz) unpacked
# into $DATA, and $OUTDIR made.
DATA=/tmp/h100_data
mkdir -p "$DATA" "$OUTDIR"
cp .data/gpu/h100/* "$DATA/"
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('$DATA/train.bin.xz'), open('$DATA/train.bin', 'wb'))"
rm "$DATA/train.bin.xz"
