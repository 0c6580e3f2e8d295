//! Status codes, the calling thread's last error message, and the guard every exported function
//! runs its body in, so that no panic crosses the boundary.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use moe_a2a::MoeError;

/// What every function of the library returns: `MOE_STATUS_OK`, or the category of its error,
/// whose message `moe_last_error` returns on the same thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeStatus {
    Ok = 0,
    /// An argument is malformed: a null pointer, an unknown code, a tensor of the wrong shape,
    /// dtype or place, an expert id out of range, a call out of order.
    InvalidArgument = 1,
    /// The configuration asks for something the chosen backend does not support, or names an
    /// unknown backend; the message says what was asked, what is supported and which backends
    /// would accept it.
    Unsupported = 2,
    /// A wait ran past the timeout; the message names the rank waited for.
    Timeout = 3,
    /// A peer failed, abandoned or disagreed on this call, sent data that failed its checks, or
    /// the control plane between the ranks failed; the message names the rank.
    PeerFailed = 4,
    /// The GPU or its driver failed.
    Device = 5,
    /// A bug in this library, caught at the boundary; the message says where.
    Internal = 6,
}

/// A failed call: its status and message.
#[derive(Debug)]
pub struct Failure {
    pub status: MoeStatus,
    pub message: String,
}

impl Failure {
    /// A malformed argument.
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure {
            status: MoeStatus::InvalidArgument,
            message: message.into(),
        }
    }
}

impl From<MoeError> for Failure {
    fn from(error: MoeError) -> Self {
        Failure {
            status: category(&error),
            message: error.to_string(),
        }
    }
}

/// The status an error of the library maps to.
pub fn category(error: &MoeError) -> MoeStatus {
    use MoeError as E;
    match error {
        E::InvalidConfig { .. }
        | E::Quant(_)
        | E::InvalidInput { .. }
        | E::TooManyTokens { .. }
        | E::ForeignReceipt { .. }
        | E::Convention(_) => MoeStatus::InvalidArgument,
        E::UnknownBackend { .. }
        | E::DuplicateBackend { .. }
        | E::Incompatible { .. }
        | E::FormatMismatch { .. }
        | E::WorkspaceGroupMismatch { .. }
        | E::Unsupported(_) => MoeStatus::Unsupported,
        E::Timeout { .. } => MoeStatus::Timeout,
        E::CallMismatch { .. }
        | E::GroupOpMismatch { .. }
        | E::PeerAbandoned { .. }
        | E::PeerMovedOn { .. }
        | E::CorruptPeerData { .. }
        | E::ControlPlane { .. }
        | E::RankPanicked { .. } => MoeStatus::PeerFailed,
        E::Device(_) => MoeStatus::Device,
        // A category added to the library after this map: reported, never hidden.
        _ => MoeStatus::Internal,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Makes `message` the calling thread's last error.
pub fn set_last_error(message: &str) {
    // An interior NUL would end the C string early: it is shown escaped instead.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

/// The calling thread's last error message, for Rust callers (the Python package).
pub fn last_error() -> String {
    LAST_ERROR.with(|last| last.borrow().to_string_lossy().into_owned())
}

/// Runs `body`, turning its error or its panic into a status and the thread's last error.
pub fn guarded(body: impl FnOnce() -> Result<(), Failure>) -> MoeStatus {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return MoeStatus::Ok,
        Ok(Err(failure)) => failure,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Failure {
                status: MoeStatus::Internal,
                message: format!("moe-a2a panicked (a bug: please report it with this message): {what}"),
            }
        }
    };
    set_last_error(&failure.message);
    failure.status
}

/// The message of the last error on the calling thread: a NUL-terminated string owned by the
/// library, valid until the thread's next failing call; empty when no call has failed.
#[unsafe(no_mangle)]
pub extern "C" fn moe_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// The name of a status code (`"MOE_STATUS_TIMEOUT"`), a static string; `"MOE_STATUS_UNKNOWN"`
/// for a code this library does not define.
#[unsafe(no_mangle)]
pub extern "C" fn moe_status_name(status: i32) -> *const c_char {
    let name: &'static [u8] = match status {
        0 => b"MOE_STATUS_OK\0",
        1 => b"MOE_STATUS_INVALID_ARGUMENT\0",
        2 => b"MOE_STATUS_UNSUPPORTED\0",
        3 => b"MOE_STATUS_TIMEOUT\0",
        4 => b"MOE_STATUS_PEER_FAILED\0",
        5 => b"MOE_STATUS_DEVICE\0",
        6 => b"MOE_STATUS_INTERNAL\0",
        _ => b"MOE_STATUS_UNKNOWN\0",
    };
    name.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    fn last() -> String {
        // SAFETY: moe_last_error returns a NUL-terminated string owned by this thread's slot,
        // read before any other call on the thread.
        unsafe { CStr::from_ptr(moe_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn an_error_becomes_its_status_and_the_threads_message() {
        let status = guarded(|| Err(MoeError::TooManyTokens { tokens: 9, max: 8 }.into()));
        assert_eq!(status, MoeStatus::InvalidArgument);
        assert!(last().contains("9"), "{}", last());
        // Another thread's last error is its own.
        std::thread::spawn(|| assert_eq!(last(), "")).join().unwrap();
    }

    #[test]
    fn a_panic_is_caught_and_reported_as_internal() {
        let status = guarded(|| panic!("boom at the boundary"));
        assert_eq!(status, MoeStatus::Internal);
        assert!(last().contains("boom at the boundary"), "{}", last());
    }

    #[test]
    fn a_message_with_a_nul_is_kept_whole() {
        set_last_error("before\0after");
        assert_eq!(last(), "before\\0after");
    }

    #[test]
    fn every_status_has_its_name() {
        for (status, name) in [
            (MoeStatus::Ok, "MOE_STATUS_OK"),
            (MoeStatus::Timeout, "MOE_STATUS_TIMEOUT"),
            (MoeStatus::Internal, "MOE_STATUS_INTERNAL"),
        ] {
            // SAFETY: moe_status_name returns a static NUL-terminated string.
            let got = unsafe { CStr::from_ptr(moe_status_name(status as i32)) };
            assert_eq!(got.to_str().unwrap(), name);
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(moe_status_name(99)) };
        assert_eq!(unknown.to_str().unwrap(), "MOE_STATUS_UNKNOWN");
    }
}
