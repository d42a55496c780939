//! SQLite's memory from the process's allocator (mimalloc) instead of the C library's.
//!
//! The ledger's writer thread allocates for every row it writes (bound values, cursors,
//! the page cache). Through glibc's `malloc` those allocations lived in an arena of the
//! writer's own that kept what a burst of records had touched: after 9,000 streams ended,
//! tollgate's resident memory grew for a minute as that thread wrote their rows, and never
//! shrank (benches/README.md). mimalloc hands freed pages back to the OS, and costs fewer
//! instructions per allocation.

use std::ffi::{c_int, c_void};

use rusqlite::ffi;

/// Routes SQLite's allocations to mimalloc. It takes effect only before SQLite's first use
/// in the process (`sqlite3_config` is refused after `sqlite3_initialize`), and must not run
/// while another thread uses SQLite: call it at start, before any database is opened.
/// Returns whether SQLite took it; if not, SQLite keeps its own allocator, which works the
/// same.
pub fn use_process_allocator() -> bool {
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(malloc),
        xFree: Some(free),
        xRealloc: Some(realloc),
        xSize: Some(size),
        xRoundup: Some(roundup),
        xInit: Some(init),
        xShutdown: Some(shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: SQLITE_CONFIG_MALLOC takes a pointer to a `sqlite3_mem_methods`, which SQLite
    // copies before it returns; the functions it names are sound for any argument SQLite
    // passes (below). The caller guarantees no other thread uses SQLite meanwhile.
    let rc = unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_MALLOC,
            &methods as *const ffi::sqlite3_mem_methods,
        )
    };
    rc == ffi::SQLITE_OK
}

// SQLite calls these with sizes above zero (its wrappers handle zero and negative sizes and
// null pointers before they reach an allocator) and frees only what they returned.

unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
    match usize::try_from(n) {
        // SAFETY: any size may be asked of mimalloc; null means it has no memory.
        Ok(n) => unsafe { libmimalloc_sys::mi_malloc(n) },
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: `p` came from `malloc` or `realloc` above (or is null).
    unsafe { libmimalloc_sys::mi_free(p) }
}

unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    match usize::try_from(n) {
        // SAFETY: as `free`; mimalloc keeps `p` when it cannot grow it.
        Ok(n) => unsafe { libmimalloc_sys::mi_realloc(p, n) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// What SQLite may use of an allocation: at least what it asked for.
unsafe extern "C" fn size(p: *mut c_void) -> c_int {
    // SAFETY: as `free`.
    let n = unsafe { libmimalloc_sys::mi_usable_size(p) };
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

/// What an allocation of `n` bytes gets: SQLite sizes some buffers to use all of it.
unsafe extern "C" fn roundup(n: c_int) -> c_int {
    match usize::try_from(n) {
        // SAFETY: `mi_good_size` takes any size and reads no memory.
        Ok(n) => c_int::try_from(unsafe { libmimalloc_sys::mi_good_size(n) }).unwrap_or(c_int::MAX),
        Err(_) => n,
    }
}

unsafe extern "C" fn init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn shutdown(_: *mut c_void) {}
