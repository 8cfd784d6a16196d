"""Security defaults: no pickle loads, no remote code by default, loopback servers, sandboxed chat templates."""
from __future__ import annotations

import ast
import re
import subprocess

import pytest
import yaml
from helpers import ROOT

SOURCES = sorted(p for folder in ("stages", "tools", "src") for p in (ROOT / folder).rglob("*.py"))


def calls(name: str):
    """(file, ast.Call) for every call to an attribute or function called `name` in the project's code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                fn = node.func
                if (isinstance(fn, ast.Attribute) and fn.attr == name) or (isinstance(fn, ast.Name) and fn.id == name):
                    yield path, node


def kwarg(node: ast.Call, key: str):
    return next((k.value for k in node.keywords if k.arg == key), None)


def test_every_torch_load_is_weights_only():
    for path, node in calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
            value = kwarg(node, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}"


def test_no_pickle_or_shell_in_stages():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M), path
        assert "shell=True" not in text and "os.system(" not in text, path


def test_remote_code_is_opt_in():
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["base"]["trust_remote_code"] is False
    for path, node in calls("from_pretrained"):
        value = kwarg(node, "trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{node.lineno}"


def test_servers_bind_loopback_by_default():
    out = subprocess.run(["make", "-n", "mlflow-ui", "mlflow-server", "STAMP=/dev/null"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    hosts = re.findall(r"--host\s+(\S+)", out)
    assert hosts and set(hosts) == {"127.0.0.1"}, out


def test_untrusted_chat_template_renders_in_a_sandbox():
    from jinja2.exceptions import SecurityError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    fmt = Jinja2ChatFormatter(template=evil, eos_token="</s>", bos_token="<s>")
    with pytest.raises(SecurityError):
        fmt(messages=[{"role": "user", "content": "hi"}])
