//! tonic's [`NamedService`] for [`VerifyService`] (feature `tonic`): with it one gRPC service of
//! a `Server` can be protected on its own,
//! `Server::builder().add_service(VerifyLayer::new(..).layer(OrdersServer::new(..)))`, while
//! another (`grpc.health.v1.Health` for a Kubernetes probe) stays unsigned on the same port.
//! The name is the wrapped service's: tonic routes `/<NAME>/<method>` to it as before.

use tonic::server::NamedService;

use super::VerifyService;

impl<S: NamedService> NamedService for VerifyService<S> {
    const NAME: &'static str = S::NAME;
}
