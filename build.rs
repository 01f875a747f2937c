//! Chooses the BLAS backend and tells the crate which one through cfgs:
//! `ndlora_blas` (some BLAS is linked) and `ndlora_backend="<name>"`.
//!
//! Order of precedence:
//! 1. `NDLORA_BLAS=none` always builds the pure-Rust fallback.
//! 2. One cargo feature (`openblas`, `openblas-static`, `blis`, `netlib`, `intel-mkl`,
//!    `accelerate`): `blas-src` links that library. Two or more features are an error.
//! 3. `NDLORA_BLAS=openblas` (or `system`): a system OpenBLAS must be found, else the build fails.
//! 4. Nothing chosen: a system OpenBLAS is linked if found (pkg-config, then the usual library
//!    directories); otherwise the fallback is built with a `cargo:warning` saying how to get BLAS.

use std::env;
use std::path::{Path, PathBuf};

/// (cargo feature, backend name) for the blas-src family.
const FEATURES: [(&str, &str); 6] = [
    ("openblas", "openblas"),
    ("openblas-static", "openblas"),
    ("blis", "blis"),
    ("netlib", "netlib"),
    ("intel-mkl", "intel-mkl"),
    ("accelerate", "accelerate"),
];

const HOW_TO_GET_BLAS: &str = "install a system OpenBLAS (Debian/Ubuntu: `apt-get install -y libopenblas-dev`, \
     Fedora: `dnf install openblas-devel`, macOS: `brew install openblas`) and rebuild, \
     or enable one of the cargo features openblas, openblas-static, blis, netlib, intel-mkl, accelerate";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NDLORA_BLAS");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=OPENBLAS_LIB_DIR");
    println!("cargo::rustc-check-cfg=cfg(ndlora_blas)");
    println!("cargo::rustc-check-cfg=cfg(ndlora_optimized)");
    // The codegen audit (tests/codegen.rs) checks register use only where the optimiser
    // ran: at the dev profile's opt-level every kernel keeps values on the stack.
    if matches!(env::var("OPT_LEVEL").as_deref(), Ok("2" | "3")) {
        println!("cargo:rustc-cfg=ndlora_optimized");
    }
    println!(
        "cargo::rustc-check-cfg=cfg(ndlora_backend, values(\"openblas\", \"blis\", \"netlib\", \"intel-mkl\", \"accelerate\"))"
    );

    let enabled: Vec<(&str, &str)> = FEATURES
        .iter()
        .copied()
        .filter(|(feature, _)| env::var_os(feature_env(feature)).is_some())
        .collect();
    if enabled.len() > 1 {
        let names: Vec<&str> = enabled.iter().map(|(f, _)| *f).collect();
        panic!(
            "ndlora: the BLAS backend features {names:?} conflict; enable at most one of \
             openblas, openblas-static, blis, netlib, intel-mkl, accelerate"
        );
    }
    let forced = env::var("NDLORA_BLAS")
        .ok()
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty());

    match (enabled.first(), forced.as_deref()) {
        (_, Some("none")) => {
            println!("cargo:rustc-env=NDLORA_BACKEND_DETAIL=pure-Rust fallback (NDLORA_BLAS=none)");
        }
        (Some((feature, backend)), None) => use_feature(feature, backend),
        (Some((feature, backend)), Some(v)) if v == *feature || v == *backend => {
            use_feature(feature, backend)
        }
        (Some((feature, _)), Some(v)) => panic!(
            "ndlora: NDLORA_BLAS={v} conflicts with the enabled cargo feature `{feature}`; \
             unset NDLORA_BLAS, set it to `{feature}` or `none`, or change the feature"
        ),
        (None, Some("openblas" | "system")) => match find_system_openblas() {
            Some(how) => link_system_openblas(&how),
            None => panic!(
                "ndlora: NDLORA_BLAS=openblas was requested but no system OpenBLAS was found \
                 (tried pkg-config `openblas` and the usual library directories; set \
                 OPENBLAS_LIB_DIR to the directory holding libopenblas). To fix: {HOW_TO_GET_BLAS}"
            ),
        },
        (None, Some(v @ ("openblas-static" | "blis" | "netlib" | "intel-mkl" | "accelerate"))) => {
            panic!("ndlora: NDLORA_BLAS={v} needs the cargo feature: build with `--features {v}`")
        }
        (None, Some(v)) => panic!(
            "ndlora: unknown NDLORA_BLAS={v}; expected one of none, openblas (system), \
             openblas-static, blis, netlib, intel-mkl, accelerate"
        ),
        (None, None) => match find_system_openblas() {
            Some(how) => link_system_openblas(&how),
            None => {
                println!(
                    "cargo:warning=ndlora: no BLAS found, building the pure-Rust gemm fallback \
                     (slower). To get BLAS: {HOW_TO_GET_BLAS}"
                );
                println!(
                    "cargo:rustc-env=NDLORA_BACKEND_DETAIL=pure-Rust fallback (no BLAS found)"
                );
            }
        },
    }
}

fn feature_env(feature: &str) -> String {
    format!(
        "CARGO_FEATURE_{}",
        feature.to_ascii_uppercase().replace('-', "_")
    )
}

fn use_feature(feature: &str, backend: &str) {
    // blas-src (a dependency enabled by the feature) emits the link lines.
    println!("cargo:rustc-cfg=ndlora_blas");
    println!("cargo:rustc-cfg=ndlora_backend=\"{backend}\"");
    println!("cargo:rustc-env=NDLORA_BACKEND_DETAIL={backend} (cargo feature `{feature}`)");
}

/// How a system OpenBLAS was found.
enum Found {
    PkgConfig(Box<pkg_config::Library>),
    Dir(PathBuf),
}

fn find_system_openblas() -> Option<Found> {
    if let Ok(dir) = env::var("OPENBLAS_LIB_DIR") {
        let dir = PathBuf::from(dir);
        return has_openblas(&dir).then_some(Found::Dir(dir));
    }
    // cargo_metadata(false): we print the link lines ourselves once we decide.
    if let Ok(lib) = pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("openblas")
    {
        return Some(Found::PkgConfig(Box::new(lib)));
    }
    let mut dirs: Vec<PathBuf> = env::var("LIBRARY_PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
            "/opt/OpenBLAS/lib",
            "/opt/homebrew/opt/openblas/lib",
            "/usr/local/opt/openblas/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.into_iter().find(|d| has_openblas(d)).map(Found::Dir)
}

fn has_openblas(dir: &Path) -> bool {
    ["libopenblas.so", "libopenblas.dylib", "libopenblas.a"]
        .iter()
        .any(|f| dir.join(f).exists())
}

fn link_system_openblas(found: &Found) {
    let detail = match found {
        Found::PkgConfig(lib) => {
            for dir in &lib.link_paths {
                println!("cargo:rustc-link-search=native={}", dir.display());
            }
            for name in &lib.libs {
                println!("cargo:rustc-link-lib={name}");
            }
            if lib.libs.is_empty() {
                println!("cargo:rustc-link-lib=openblas");
            }
            format!("openblas (system, pkg-config {})", lib.version)
        }
        Found::Dir(dir) => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-lib=openblas");
            format!("openblas (system, {})", dir.display())
        }
    };
    println!("cargo:rustc-cfg=ndlora_blas");
    println!("cargo:rustc-cfg=ndlora_backend=\"openblas\"");
    println!("cargo:rustc-env=NDLORA_BACKEND_DETAIL={detail}");
}
