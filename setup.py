"""Package discovery for the repo layout: the top-level folders common/, ascend/, cuda/ and configs/ are the
subpackages dsv4.common, dsv4.ascend, dsv4.cuda and dsv4.configs. pyproject.toml cannot prefix the packages that
`find` discovers, so the mapping is computed here: every package under those folders is installed, also by a
plain (non-editable) `pip install .`, without a hand-kept list. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = {"common": "dsv4.common", "ascend": "dsv4.ascend", "cuda": "dsv4.cuda"}

package_dir = {"dsv4": "dsv4", "dsv4.configs": "configs", **{name: folder for folder, name in FOLDERS.items()}}
packages = ["dsv4", "dsv4.configs"]
for folder, name in FOLDERS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
