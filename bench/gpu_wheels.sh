# Sourced by the bench/*_gpu.sh scripts: the packages the GPU image lacks (DeepSpeed, Hydra, webdataset, and
# whatever NEEDS lists instead, a comma-separated import list) from the wheels in .whl/
# (../shared/tools/device-wheels .whl), installed into .site once: a later call on the same warm machine
# finds them there and installs nothing.
NEEDS=${NEEDS:-deepspeed, hydra, webdataset}
if [ -d .site ]; then export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}; fi
if [ -d .whl ] && ! python3 -c "import $NEEDS" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
