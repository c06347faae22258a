//! The balancing core: which endpoint gets the next request or connection.
//!
//! Sans-IO and deterministic: no sockets, no async runtime, no Kubernetes.
//! Time comes from an injected [`Clock`] and randomness from a seeded RNG, so
//! every behaviour can be tested exactly. The proxy drives it:
//!
//! ```
//! use std::sync::Arc;
//! use fulcrum::balance::{Algorithm, Balancer, BalancerConfig, EndpointSet, EndpointSpec,
//!     EwmaConfig, Outcome, Request, SystemClock};
//!
//! let specs = ["127.0.0.2:8080", "127.0.0.3:8080"].map(|a| EndpointSpec::new(a.parse().unwrap()));
//! let set = Arc::new(EndpointSet::new(Arc::new(SystemClock::new()), EwmaConfig::default(), specs).unwrap());
//! let mut balancer = Balancer::new(BalancerConfig::new(Algorithm::PeakEwma), set, 42).unwrap();
//! let pick = balancer.pick(&Request::default()).expect("two available endpoints");
//! // ... forward the request to pick.addr() ...
//! pick.complete(Outcome::Success); // or drop it: the endpoint is released either way
//! ```

mod affinity;
mod balancer;
mod clock;
mod config;
mod endpoint;
mod least;
mod load;
mod maglev;
mod outlier;
mod random;
mod slab;
mod smooth_wrr;

pub use affinity::{AffinityToken, BadToken};
pub use balancer::{Balancer, Request};
pub use clock::{Clock, ManualClock, Nanos, SystemClock, duration_nanos};
pub use config::{Algorithm, BalancerConfig, ConfigError, UnknownAlgorithm};
pub use endpoint::{
    DEFAULT_TRACK, Endpoint, EndpointSet, EndpointSpec, EwmaConfig, Health, HealthFlag, Member, SetError,
};
pub use load::{Outcome, Pick};
pub use maglev::{DEFAULT_TABLE_SIZE, hash_key, table_size};
pub use outlier::{OutlierConfig, OutlierDetector, OutlierEvent};
