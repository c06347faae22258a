//! The operator's pure parts: desired objects per mode and option, and the
//! proxy configuration rendered from a spec.

mod desired;
mod healing;
