//! Machine-code audit of the x86-64 SIMD kernels, runnable on any x86-64 machine (whatever
//! ISA the CPU itself has): disassembles this test's own executable with `objdump -d -C`
//! (binutils; set `OBJDUMP` to use another binary), finds each kernel in [`KERNELS`] by its
//! demangled name and checks its instructions:
//!
//! * no kernel holds a gather or scatter (`vgather*`, `vpgather*`, `vscatter*`,
//!   `vpscatter*`): a kernel that streams contiguous rows has no use for them, and their
//!   presence means the compiler turned lane-wise code into per-element memory accesses;
//! * an AVX-512 kernel holds FMAs on `zmm` registers, an AVX2 kernel FMAs on `ymm` registers;
//!   the AVX512_BF16 merge kernel also `vcvtneps2bf16`, and the AVX2 reductions an unsigned
//!   max on `ymm` registers;
//! * a kernel that reads a half-precision W widens it in registers with the instruction its
//!   type needs: `vcvtph2ps` for f16, `vpmovzxwd` and `vpslld` (zero-extend, shift up 16)
//!   for bf16;
//! * no innermost loop that holds FMAs keeps its accumulators in memory: fewer vector
//!   stores to the stack (`(%rsp)`) than a quarter of its FMAs. A loop is a backward jump
//!   inside the function; innermost, one that encloses no other. The AVX2 bf16 merge kernel
//!   once stored all 12 accumulators of its tile on every step of this loop (its epilogue
//!   indexed them in a loop the compiler did not unroll), which ran it at half speed on
//!   CPUs with one 256-bit store per cycle. One accumulator spilled under register
//!   pressure (a load and a store per step beside 12 FMAs, as the AVX2 f16 product's 4×3
//!   tile has) costs little and is reported, not failed. This rule holds only for an
//!   optimised build (`cargo test --release --test codegen`, as CI runs it).
//!
//! It also fails when the executable holds a function of `ndlora::simd::x86` that the table
//! does not list, so a new kernel cannot go unaudited. Run with `--nocapture` to see the
//! table of what was audited.
#![cfg(target_arch = "x86_64")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use half::{bf16, f16};
use ndarray::Array2;
use ndlora::{LoraConfig, LoraLayer, MicroLora, SimdLevel};

/// The instruction set a kernel is compiled for, which says what its FMAs must look like.
#[derive(Clone, Copy, Debug)]
enum Isa {
    /// `#[target_feature(enable = "avx2,fma")]`: FMAs on `ymm` registers.
    Avx2,
    /// `#[target_feature(enable = "avx512f")]`: FMAs on `zmm` registers.
    Avx512,
    /// AVX-512F with AVX512_BF16: FMAs on `zmm` registers and the hardware rounding to
    /// bf16 (`vcvtneps2bf16`) it was written for.
    Avx512Bf16,
    /// An AVX2 reduction (the largest magnitude over a slice): no FMA, but the unsigned
    /// max (`vpmaxuw`/`vpmaxud`) on `ymm` registers that the x86-64 baseline lacks.
    Reduce,
    /// A conversion kernel (half ↔ f32 over a row), AVX2 or AVX-512F: no arithmetic, so no
    /// FMA expected; the widening instruction is (see [`Storage`]).
    Convert,
}

/// How a kernel reads W: in its compute type, or as a half type it must widen in registers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Storage {
    /// f32 or f64: plain loads.
    Same,
    /// bf16: `vpmovzxwd` then `vpslld` (the 16-bit shift).
    Bf16,
    /// f16: `vcvtph2ps`.
    F16,
}

use Storage::{Bf16, Same, F16};

/// Every x86-64 kernel, by demangled symbol. A new kernel is one line here (and, if no
/// public call in [`link_kernels`] reaches it yet, one call there so it is linked in).
const KERNELS: &[(&str, Isa, Storage)] = &[
    ("ndlora::simd::x86::forward_avx2_fma", Isa::Avx2, Same),
    ("ndlora::simd::x86::forward_avx512f", Isa::Avx512, Same),
    ("ndlora::simd::x86::update_avx2_f32", Isa::Avx2, Same),
    ("ndlora::simd::x86::update_avx2_f64", Isa::Avx2, Same),
    ("ndlora::simd::x86::update_avx512_f32", Isa::Avx512, Same),
    ("ndlora::simd::x86::update_avx512_f64", Isa::Avx512, Same),
    ("ndlora::simd::x86::update_avx2_bf16", Isa::Avx2, Bf16),
    ("ndlora::simd::x86::update_avx2_f16", Isa::Avx2, F16),
    ("ndlora::simd::x86::update_avx512_bf16", Isa::Avx512, Bf16),
    (
        "ndlora::simd::x86::update_avx512bf16_bf16",
        Isa::Avx512Bf16,
        Bf16,
    ),
    ("ndlora::simd::x86::update_avx512_f16", Isa::Avx512, F16),
    ("ndlora::simd::x86::product_avx2_f32", Isa::Avx2, Same),
    ("ndlora::simd::x86::product_avx2_f64", Isa::Avx2, Same),
    ("ndlora::simd::x86::product_avx512_f32", Isa::Avx512, Same),
    ("ndlora::simd::x86::product_avx512_f64", Isa::Avx512, Same),
    ("ndlora::simd::x86::product_avx2_bf16", Isa::Avx2, Bf16),
    ("ndlora::simd::x86::product_avx2_f16", Isa::Avx2, F16),
    ("ndlora::simd::x86::product_avx512_bf16", Isa::Avx512, Bf16),
    ("ndlora::simd::x86::product_avx512_f16", Isa::Avx512, F16),
    ("ndlora::simd::x86::widen_avx2_bf16", Isa::Convert, Bf16),
    ("ndlora::simd::x86::widen_avx2_f16", Isa::Convert, F16),
    ("ndlora::simd::x86::widen_avx512_bf16", Isa::Convert, Bf16),
    ("ndlora::simd::x86::widen_avx512_f16", Isa::Convert, F16),
    ("ndlora::simd::x86::round_avx2_bf16", Isa::Convert, Same),
    ("ndlora::simd::x86::round_avx2_f16", Isa::Convert, Same),
    ("ndlora::simd::x86::round_avx512_bf16", Isa::Convert, Same),
    ("ndlora::simd::x86::round_avx512_f16", Isa::Convert, Same),
    (
        "ndlora::simd::x86::store_bf16_ymm_deinterleaved_nan",
        Isa::Convert,
        Same,
    ),
    (
        "ndlora::simd::x86::max_abs_bits_avx2_u16",
        Isa::Reduce,
        Same,
    ),
    (
        "ndlora::simd::x86::max_abs_bits_avx2_f32",
        Isa::Reduce,
        Same,
    ),
];

/// Functions under this path must all be in [`KERNELS`].
const KERNEL_MODULE: &str = "ndlora::simd::x86::";

/// Calls the public entry points that dispatch to the kernels, so that the linker keeps
/// every kernel in this executable (the dispatch tables refer to all of them, whichever
/// the CPU runs). The results do not matter here; other tests check them.
fn link_kernels() {
    let lora = MicroLora::new(16, 2);
    let mut y = [0.0_f32; 16];
    for level in SimdLevel::ALL {
        let _ = lora.forward_with(level, &[1.0; 16], &mut y);
    }
    let config = LoraConfig {
        rank: 2,
        ..Default::default()
    };
    let mut layer = LoraLayer::new(Array2::<f32>::zeros((8, 40)), config.clone()).unwrap();
    layer.weight_b_mut().unwrap().fill(0.5);
    layer.forward(Array2::zeros((1, 40)).view()).unwrap();
    layer.merge().unwrap();
    let mut layer = LoraLayer::new(Array2::<f64>::zeros((8, 40)), config.clone()).unwrap();
    layer.weight_b_mut().unwrap().fill(0.5);
    layer.forward(Array2::zeros((1, 40)).view()).unwrap();
    layer.merge().unwrap();
    let mut layer = LoraLayer::new(Array2::<bf16>::zeros((8, 40)), config.clone()).unwrap();
    layer.weight_b_mut().unwrap().fill(0.5);
    layer.forward(Array2::zeros((1, 40)).view()).unwrap();
    layer.merge().unwrap();
    let mut layer = LoraLayer::new(Array2::<f16>::zeros((8, 40)), config).unwrap();
    layer.weight_b_mut().unwrap().fill(0.5);
    layer.forward(Array2::zeros((1, 40)).view()).unwrap();
    layer.merge().unwrap();
}

/// One disassembled instruction: its address and its mnemonic with operands.
type Insn = (u64, String);

/// The address and text of one disassembled instruction line, if it is one
/// (`  4011d0:\tvfmadd231ps %zmm1,%zmm2,%zmm3` with `--no-show-raw-insn`).
fn instruction(line: &str) -> Option<Insn> {
    let (address, text) = line.split_once(":\t")?;
    let address = u64::from_str_radix(address.trim(), 16).ok()?;
    Some((address, text.trim().to_owned()))
}

/// Instructions of every function of the executable whose name is a kernel or lies in
/// [`KERNEL_MODULE`], by name as `objdump -C` prints it (the path without its hash, for
/// legacy and v0 mangling alike); a name may occur more than once.
fn disassemble() -> BTreeMap<String, Vec<Vec<Insn>>> {
    let exe = std::env::current_exe().expect("path of the test executable");
    let objdump = std::env::var("OBJDUMP").unwrap_or_else(|_| "objdump".to_owned());
    let mut child = Command::new(&objdump)
        .args(["-d", "-C", "--no-show-raw-insn", "-j", ".text"])
        .arg(&exe)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "the codegen audit needs `{objdump}` (GNU binutils; install the `binutils` \
                 package or set OBJDUMP) and could not run it: {e}"
            )
        });
    let mut functions: BTreeMap<String, Vec<Vec<Insn>>> = BTreeMap::new();
    let listed = |name: &str| KERNELS.iter().any(|(k, ..)| *k == name);
    let mut current: Option<String> = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("objdump output is text");
        // A function starts with `0000000000401000 <name>:`.
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .filter(|(addr, _)| addr.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|(_, name)| name.to_owned())
        {
            let wanted = name.starts_with(KERNEL_MODULE) || listed(&name);
            current = wanted.then(|| {
                functions.entry(name.clone()).or_default().push(Vec::new());
                name
            });
        } else if let (Some(name), Some(insn)) = (&current, instruction(&line)) {
            let bodies = functions.get_mut(name).unwrap();
            bodies.last_mut().unwrap().push(insn);
        }
    }
    let status = child.wait().expect("objdump ran");
    assert!(
        status.success(),
        "`{objdump} -d {}` failed: {status}",
        exe.display()
    );
    functions
}

/// What one function holds, and what the audit makes of it.
struct Finding {
    instructions: usize,
    gathers: usize,
    zmm_fmas: usize,
    ymm_fmas: usize,
    /// `vcvtph2ps` (f16 → f32).
    cvtph2ps: usize,
    /// `vpmovzxwd` and `vpslld` (bf16 → f32 is both).
    zext_words: usize,
    shifts_left: usize,
    /// `vcvtneps2bf16` (f32 → bf16 in hardware).
    cvtneps2bf16: usize,
    /// Unsigned 16- or 32-bit max on `ymm` registers.
    ymm_umax: usize,
    /// The innermost FMA loop with the most vector stores to the stack: (stores, FMAs).
    loop_spills: (usize, usize),
}

/// Whether `m` is an FMA mnemonic.
fn is_fma(m: &str) -> bool {
    ["vfmadd", "vfmsub", "vfnmadd", "vfnmsub"]
        .iter()
        .any(|p| m.starts_with(p))
}

/// Over the innermost loops of `body` that hold FMAs, the one storing the most vector
/// registers to the stack per FMA (the most stores among equals): (its stores, its FMAs),
/// or (0, 0) without such a loop.
fn worst_loop_spills(body: &[Insn]) -> (usize, usize) {
    let Some(&(first, _)) = body.first() else {
        return (0, 0);
    };
    // Loops as (target, jump) address ranges: a jump whose target lies before it.
    let loops: Vec<(u64, u64)> = body
        .iter()
        .filter(|(_, i)| i.starts_with('j'))
        .filter_map(|(at, i)| {
            let target = i.split_whitespace().nth(1)?;
            let target = u64::from_str_radix(target, 16).ok()?;
            (first <= target && target <= *at).then_some((target, *at))
        })
        .collect();
    let innermost = |&&(s, e): &&(u64, u64)| {
        !loops
            .iter()
            .any(|&(s2, e2)| (s2, e2) != (s, e) && s <= s2 && e2 <= e)
    };
    let stack_store = |i: &str| {
        // `vmovaps %ymm3,0x2a0(%rsp)`: a vector register stored to a stack slot.
        i.starts_with("vmov")
            && i.split_once(' ').is_some_and(|(_, ops)| {
                let ops = ops.trim();
                (ops.starts_with("%xmm") || ops.starts_with("%ymm") || ops.starts_with("%zmm"))
                    && ops.ends_with("(%rsp)")
            })
    };
    loops
        .iter()
        .filter(innermost)
        .map(|&(s, e)| {
            let inside = body.iter().filter(|(at, _)| s <= *at && *at <= e);
            let (mut stores, mut fmas) = (0, 0);
            for (_, i) in inside {
                stores += usize::from(stack_store(i));
                fmas += usize::from(is_fma(i.split_whitespace().next().unwrap_or("")));
            }
            (stores, fmas)
        })
        .filter(|&(_, fmas)| fmas > 0)
        // stores / fmas compared across loops without division.
        .max_by(|&(s1, f1), &(s2, f2)| (s1 * f2).cmp(&(s2 * f1)).then(s1.cmp(&s2)))
        .unwrap_or((0, 0))
}

impl Finding {
    fn of(insns: &[Insn]) -> Finding {
        let body: Vec<&String> = insns.iter().map(|(_, i)| i).collect();
        let mnemonic = |i: &&String| i.split_whitespace().next().unwrap_or("").to_owned();
        let is_gather = |m: &str| {
            ["vgather", "vpgather", "vscatter", "vpscatter"]
                .iter()
                .any(|p| m.starts_with(p))
        };
        let fmas_on = |reg: &str| {
            body.iter()
                .filter(|i| is_fma(&mnemonic(i)) && i.contains(reg))
                .count()
        };
        let count = |m: &str| body.iter().filter(|i| mnemonic(i) == m).count();
        Finding {
            instructions: body.len(),
            gathers: body.iter().filter(|i| is_gather(&mnemonic(i))).count(),
            zmm_fmas: fmas_on("%zmm"),
            ymm_fmas: fmas_on("%ymm"),
            cvtph2ps: count("vcvtph2ps"),
            zext_words: count("vpmovzxwd"),
            shifts_left: count("vpslld"),
            cvtneps2bf16: count("vcvtneps2bf16"),
            ymm_umax: body
                .iter()
                .filter(|i| {
                    ["vpmaxuw", "vpmaxud"].contains(&mnemonic(i).as_str()) && i.contains("%ymm")
                })
                .count(),
            loop_spills: worst_loop_spills(insns),
        }
    }

    /// Why the function fails the audit for `isa` reading W as `storage`, if it does.
    fn problem(&self, isa: Isa, storage: Storage) -> Option<String> {
        if self.gathers > 0 {
            return Some(format!("{} gather/scatter instructions", self.gathers));
        }
        let (stores, fmas) = self.loop_spills;
        // Only the optimised build is held to it (`build.rs` sets the cfg): at the dev
        // profile's opt-level 1 every kernel keeps values on the stack.
        if cfg!(ndlora_optimized) && stores > 0 && 4 * stores >= fmas {
            return Some(format!(
                "an innermost loop stores {stores} vectors to the stack beside {fmas} FMAs \
                 (accumulators kept in memory)"
            ));
        }
        match storage {
            F16 if self.cvtph2ps == 0 => return Some("f16 W but no vcvtph2ps".to_owned()),
            Bf16 if self.zext_words == 0 || self.shifts_left == 0 => {
                return Some("bf16 W but no vpmovzxwd + vpslld".to_owned())
            }
            _ => {}
        }
        match isa {
            Isa::Avx512 | Isa::Avx512Bf16 if self.zmm_fmas == 0 => {
                Some("no FMA on zmm registers".to_owned())
            }
            Isa::Avx512Bf16 if self.cvtneps2bf16 == 0 => Some("no vcvtneps2bf16".to_owned()),
            Isa::Reduce if self.ymm_umax == 0 => {
                Some("no unsigned max on ymm registers".to_owned())
            }
            Isa::Avx2 if self.ymm_fmas == 0 => Some("no FMA on ymm registers".to_owned()),
            _ => None,
        }
    }
}

#[test]
fn simd_kernels_compile_to_the_intended_instructions() {
    link_kernels();
    let functions = disassemble();
    let mut report = vec![format!(
        "{:<42} {:>10} {:>6} {:>8} {:>8} {:>8} {:>6} {:>11}  verdict",
        "kernel", "isa", "insns", "gathers", "zmm-fma", "ymm-fma", "widen", "loop-spill"
    )];
    let mut failures = Vec::new();
    for &(name, isa, storage) in KERNELS {
        let Some(bodies) = functions.get(name) else {
            failures.push(format!(
                "{name}: not in {} (renamed? add a call reaching it to link_kernels)",
                std::env::current_exe().unwrap().display()
            ));
            continue;
        };
        for body in bodies {
            let f = Finding::of(body);
            let problem = f.problem(isa, storage);
            let widen = match storage {
                Same => 0,
                Bf16 => f.zext_words.min(f.shifts_left),
                F16 => f.cvtph2ps,
            };
            report.push(format!(
                "{name:<42} {:>10} {:>6} {:>8} {:>8} {:>8} {:>6} {:>11}  {}",
                format!("{isa:?}").to_lowercase(),
                f.instructions,
                f.gathers,
                f.zmm_fmas,
                f.ymm_fmas,
                widen,
                format!("{}/{}", f.loop_spills.0, f.loop_spills.1),
                problem.as_deref().unwrap_or("ok")
            ));
            if let Some(problem) = problem {
                failures.push(format!("{name} ({isa:?}): {problem}"));
            }
        }
    }
    for name in functions.keys() {
        if !KERNELS.iter().any(|(k, ..)| k == name) {
            failures.push(format!(
                "{name}: a function of {KERNEL_MODULE} not listed in KERNELS"
            ));
        }
    }
    let report = report.join("\n");
    assert!(
        failures.is_empty(),
        "codegen audit failed:\n  {}\n\n{report}",
        failures.join("\n  ")
    );
    println!("codegen audit passed:\n{report}");
}
