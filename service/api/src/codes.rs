//! JSON-RPC error codes used by bangerd.
//!
//! The standard codes (-32700 … -32603) come from the JSON-RPC 2.0 specification and are
//! produced by the transport. The application codes below are banger's own; the CLI maps
//! each to a process exit status (see the client's `exit` module).

/// Invalid JSON was received.
pub const PARSE_ERROR: i32 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i32 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i32 = -32602;
/// Internal error in the daemon.
pub const INTERNAL_ERROR: i32 = -32603;

/// The caller is not the daemon's owner, root, or a member of the `banger` group.
pub const PERMISSION_DENIED: i32 = -32001;
/// The named object (VM, image, kernel, …) does not exist.
pub const NOT_FOUND: i32 = -32004;
/// The object exists already, or is in a state that forbids the operation.
pub const CONFLICT: i32 = -32009;
/// The request is well formed but its values are not acceptable.
pub const INVALID_ARGUMENT: i32 = -32022;
/// The daemon is shutting down and accepts no new work.
pub const SHUTTING_DOWN: i32 = -32050;
/// The daemon's store could not be read or written.
pub const STORE: i32 = -32060;
