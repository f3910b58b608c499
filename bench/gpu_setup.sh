# Shared by bench/gpu_train_check.sh and bench/gpu_infer_check.sh (sourced, not run): the set-up of a
# bare GPU machine before a measurement.
#
#     gpu_setup SCRIPT PACKAGE...   # SCRIPT: the bench script that names a missing package
#
# 1. installs the wheels carried in .whl/ (if any) into $SITE (default /tmp/site), offline, without
#    dependencies, and puts $SITE on PYTHONPATH; a wheel for another Python/platform is skipped;
# 2. prints nvidia-smi, Python, the versions of the PACKAGEs, torch's CUDA and SDPA back-ends.
# Expects PY (the python to use) and to run from the repo root.

gpu_setup() {
    local script=$1
    shift
    SITE=${SITE:-/tmp/site}
    echo "== $(date -u '+%F %T') UTC, $(hostname), repo $(pwd)"
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "== installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
            # one wheel for another Python/platform fails the whole batch: install the others one by one
            echo "!! batch install failed; installing the wheels one by one"
            for wheel in .whl/*.whl; do
                "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" \
                    || echo "!! skipped $(basename "$wheel") ($script names what is missing)"
            done
        fi
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "== no .whl/ folder: using the installed packages"
    fi
    echo "== nvidia-smi"
    nvidia-smi || echo "!! nvidia-smi failed"
    echo "== versions"
    "$PY" - "$@" <<'PYEOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in sys.argv[1:]:
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} not installed")
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    print("sdpa backends: flash", torch.backends.cuda.flash_sdp_enabled(), "mem_efficient",
          torch.backends.cuda.mem_efficient_sdp_enabled(), "math", torch.backends.cuda.math_sdp_enabled())
except Exception as e:
    print("!! torch:", type(e).__name__, e)
PYEOF
}
