"""Write the HTML template `dvc plots show` / `dvc plots diff` render into, with vega, vega-lite and vega-embed
inlined, so the data plots draw with no network (DVC's own template loads them from a CDN).

Run: python -m tools.plots_template --out .venv/dvc-plots.html   (`make setup` does; .dvc/config points at it)

The libraries come from the pinned vl-convert-python package (its `javascript_bundle`), not from a committed
minified file; the bundle sets `window.vega`, `window.vegaLite` and `window.vegaEmbed`, which DVC's plot divs call.
"""
from __future__ import annotations

import argparse

from alpaca_lora_cpu.files import write_text

# DVC's vega templates write Vega-Lite v5 specs ("$schema": .../vega-lite/v5.json): bundle a v5 compiler.
VEGA_LITE = "5.20"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline: {versions})</title>
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    """The template: DVC replaces `{plot_divs}` (and `{refresh_tag}`); no `{scripts}`, so no CDN tags go in."""
    import vl_convert as vlc

    bundle = vlc.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle:  # would end the inline script early
        bundle = bundle.replace("</script", "<\\/script")
    versions = f"vega {vlc.get_vega_version()}, vega-lite {VEGA_LITE}, vega-embed {vlc.get_vega_embed_version()}"
    return PAGE.replace("{versions}", versions).replace("{bundle}", bundle)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the template")
    args = ap.parse_args(argv)
    write_text(args.out, page())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
