"""Sphinx configuration of wsmanager's documentation: offline, strict (-W -n), built in seconds."""

import os
import sys

# The wsmanager.py beside this folder, not an installed copy: the docs describe the code they ship with.
sys.path.insert(0, os.path.abspath(".."))

import wsmanager  # noqa: E402

project = "wsmanager"
author = "the wsmanager authors"
copyright = "the wsmanager authors, MIT license"
version = release = wsmanager.__version__

extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
templates_path = []
html_static_path = ["_static"]
html_theme = "furo"
html_title = f"wsmanager {release}"
html_show_sourcelink = False
html_copy_source = False

nitpicky = True
# No network at build time: the inventory of the standard library's documentation is stored in the repository
# (Python 3.11's objects.inv, from Debian's python3.11-doc package), so that links to it resolve offline.
extensions.append("sphinx.ext.intersphinx")
intersphinx_mapping = {"python": ("https://docs.python.org/3", "_inventories/python.inv")}
nitpick_ignore_regex = [
    # Private type variables and aliases in signatures (_WebSocketT: the factory's class; _Address: a
    # (host, port) tuple or a Unix path) are not documented names; everything public must resolve.
    (r"py:class", r"wsmanager\._\w+"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True}
# One line per parameter once a signature is long: WebSocketManager's are.
maximum_signature_line_length = 88
python_use_unqualified_type_names = True
