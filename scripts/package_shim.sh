# Source from a device script: lets Python import `tokenskip` from this checkout with no install, through
# a symlink tree with the package layout of pyproject.toml (core/ -> tokenskip, train/ export/ plugins/
# deploy/ -> subpackages). Sets SHIM (remove it when done), PYTHONPATH and TOKENSKIP_CACHE.
SHIM=$(mktemp -d)
mkdir -p "$SHIM/tokenskip"
for f in core/*; do ln -s "$PWD/$f" "$SHIM/tokenskip/$(basename "$f")"; done
for sub in train export plugins deploy; do ln -s "$PWD/$sub" "$SHIM/tokenskip/$sub"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export TOKENSKIP_CACHE="$SHIM/cache"
