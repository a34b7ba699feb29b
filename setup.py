"""Build of the optional native data path (``ipsecct.ipsec._esp``, issue 11).

Everything else is in pyproject.toml. The extension is optional: without a C compiler, the
OpenSSL headers (Debian: libssl-dev) or the Python headers, the build prints a warning and
ipsecct installs and runs on its pure-Python data path.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that never fails the installation."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            print(f"WARNING: ipsecct's native data path was not built ({exc}); "
                  "the pure-Python path is used")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"WARNING: ipsecct's native data path was not built ({exc}); "
                  "the pure-Python path is used")


setup(
    ext_modules=[
        Extension(
            "ipsecct.ipsec._esp",
            sources=["src/ipsecct/ipsec/_esp.c"],
            libraries=["crypto"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Werror", "-O2"],
            optional=True,
        ),
        Extension(
            "ipsecct.ct._cdb",
            sources=["src/ipsecct/ct/_cdb.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Werror", "-O2"],
            optional=True,
        ),
        Extension(
            "ipsecct.ikev2._tlv",
            sources=["src/ipsecct/ikev2/_tlv.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Werror", "-O2"],
            optional=True,
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
