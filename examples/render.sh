#!/usr/bin/env bash
# Render the example notebook to HTML (executed) and screenshot it in headless Chromium, for review.
#   needs: pip install nbconvert '.[notebook]'; apt-get install chromium
#   usage: examples/render.sh [OUTDIR]      (writes OUTDIR/twfix.html and OUTDIR/twfix.png; default /tmp/twfix-notebook)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-/tmp/twfix-notebook}
mkdir -p "$out"
jupyter nbconvert --to html --execute --ExecutePreprocessor.timeout=120 --output-dir "$out" "$here/twfix.ipynb"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no Chromium found (apt-get install chromium); the HTML is at $out/twfix.html" >&2
  exit 1
fi
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,4000 \
  --screenshot="$out/twfix.png" "file://$out/twfix.html" 2>/dev/null
echo "$out/twfix.html"
echo "$out/twfix.png"
