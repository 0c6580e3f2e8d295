//! What the linked backends are and support, for C callers choosing one before building it.

use std::ffi::{CString, c_char};
use std::sync::OnceLock;

/// The names of the linked backends, comma-separated, and the capability matrix, each built
/// once for the process.
fn texts() -> &'static (CString, CString) {
    static TEXTS: OnceLock<(CString, CString)> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let registry = moe_a2a::registry();
        let c = |text: String| CString::new(text).unwrap_or_default();
        (c(registry.names().join(",")), c(registry.render_matrix()))
    })
}

/// The names of the backends linked into this library, comma-separated and sorted
/// (`"allgather-rs,nvlink-one-sided,nvlink-two-sided"`): a static string.
#[unsafe(no_mangle)]
pub extern "C" fn moe_backends() -> *const c_char {
    texts().0.as_ptr()
}

/// The capability matrix of the linked backends, one Markdown table row per backend (quant
/// schemes, formats, parallel modes, platforms, peer access, limits), as README.md shows it:
/// a static string.
#[unsafe(no_mangle)]
pub extern "C" fn moe_capability_matrix() -> *const c_char {
    texts().1.as_ptr()
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    #[test]
    fn the_linked_backends_and_their_matrix_are_listed() {
        // SAFETY: both return static NUL-terminated strings.
        let (names, matrix) = unsafe { (CStr::from_ptr(moe_backends()), CStr::from_ptr(moe_capability_matrix())) };
        assert_eq!(names.to_str().unwrap(), moe_a2a::BUILTIN_BACKENDS.join(","));
        let matrix = matrix.to_str().unwrap();
        for name in moe_a2a::BUILTIN_BACKENDS {
            assert!(matrix.contains(&format!("| {name} |")), "{matrix}");
        }
    }
}
