//! Distributed tracing: a client span per outbound request and a server span
//! per inbound one, W3C `traceparent`/`tracestate` propagated (or started),
//! exported by OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT` (Jaeger's 4317).
//!
//! Spans are `tracing` spans on [`TRACE_TARGET`], turned into OpenTelemetry
//! spans by tracing-opentelemetry and exported in batches from the SDK's own
//! thread: the data path only hands a finished span to a bounded queue.
//! Sampling is parent-based (a caller's decision is honoured) with a ratio
//! for new traces. Without an endpoint nothing is created and headers pass
//! through untouched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use prometheus_client::metrics::counter::Counter;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;

/// Target of the spans that are exported.
pub const TRACE_TARGET: &str = "wayfinder::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are being made.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Where spans go and what is known about this sidecar.
pub struct Config {
    /// OTLP/gRPC collector, e.g. `http://jaeger:4317`.
    pub endpoint: String,
    /// Share of new traces sampled (0-1); callers' decisions are kept.
    pub sampling: f64,
    /// Resource attributes: the sidecar's service and instance.
    pub service: String,
    /// Instance id.
    pub instance: String,
}

/// Counters of the export.
#[derive(Clone, Default)]
pub struct ExportCounters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans lost because an export failed (collector away or slow).
    pub dropped: Counter,
}

/// The running exporter; flushes on drop.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// A `tracing` layer to install, and the exporter behind it.
pub type Installed = (
    Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>,
    Tracing,
);

/// Sets up export to `cfg.endpoint`; call inside the tokio runtime.
pub fn init(cfg: &Config, counters: ExportCounters) -> anyhow::Result<Installed> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    // Our own channel: it resolves the collector's name without libc
    // (static binaries in scratch images), e.g. http://jaeger:4317.
    let channel = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(|e| anyhow::anyhow!("{:?} is not a URL: {e}", cfg.endpoint))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect_with_connector_lazy(wayfinder_proto::dial::Dialer);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_channel(channel)
        .with_timeout(std::time::Duration::from_secs(3))
        .build()?;
    let exporter = OnRuntime {
        inner: Arc::new(exporter),
        runtime: tokio::runtime::Handle::current(),
        counters,
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            cfg.instance.clone(),
        ))
        .build();
    // Export every second (the SDK's default is 5 s) unless the standard
    // variable says otherwise: a lab user looks for a trace right away.
    let mut batch = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
        batch = batch.with_scheduled_delay(std::time::Duration::from_secs(1));
    }
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sampling,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("wf-proxy");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target() == TRACE_TARGET
        }));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((Box::new(layer), Tracing { provider }))
}

/// Runs exports on the sidecar's tokio runtime. The SDK's batch processor
/// exports from its own thread, where tonic would find no reactor; the
/// export future is spawned on the runtime and only awaited there.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
    counters: ExportCounters,
}

impl std::fmt::Debug for ExportCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportCounters")
    }
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let inner = self.inner.clone();
        let result = self
            .runtime
            .spawn(async move { inner.export(batch).await })
            .await
            .unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    e.to_string(),
                ))
            });
        match &result {
            Ok(()) => {
                self.counters.exported.inc_by(n);
            }
            Err(e) => {
                self.counters.dropped.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed; dropped");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called once while the provider is built, before any export
        // shares the exporter.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The span of one proxied request.
pub enum Kind {
    /// Outbound: this sidecar calls `service`.
    Client,
    /// Inbound: this sidecar hands the request to its app.
    Server,
}

/// Starts a span for a request with `headers`, as a child of the caller's
/// context when the headers carry one; `Span::none()` when tracing is off.
pub fn span(
    kind: Kind,
    service: &str,
    method: &str,
    path: &str,
    headers: &HeaderMap,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = match kind {
        Kind::Client => tracing::info_span!(
            target: TRACE_TARGET,
            "outbound",
            otel.name = %format_args!("{method} {service}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = method,
            url.path = path,
            wayfinder.service = service,
            wayfinder.endpoint = tracing::field::Empty,
            wayfinder.route = tracing::field::Empty,
            wayfinder.backend = tracing::field::Empty,
            wayfinder.attempts = tracing::field::Empty,
            wayfinder.retries = tracing::field::Empty,
            wayfinder.error = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        ),
        Kind::Server => tracing::info_span!(
            target: TRACE_TARGET,
            "inbound",
            otel.name = %format_args!("{method} {service}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = method,
            url.path = path,
            wayfinder.service = service,
            wayfinder.error = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        ),
    };
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(parent);
    span
}

/// Writes `span`'s context into `headers` as `traceparent`/`tracestate`, so
/// the next hop's span is its child. Nothing when the span is disabled.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_none() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

/// Records how a request ended on its span.
pub fn finish(span: &tracing::Span, status: u16, error: Option<&str>) {
    if span.is_none() {
        return;
    }
    span.record("http.response.status_code", status);
    if let Some(e) = error {
        span.record("wayfinder.error", e);
    }
    if status >= 500 || error.is_some() {
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn a_traceparent_is_read_and_written_back_in_w3c_form() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let cx = TraceContextPropagator::new().extract(&Headers(&h));
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        let mut out = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(&mut out));
        assert_eq!(
            out.get("traceparent").map(|v| v.as_bytes()),
            Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..])
        );
        assert_eq!(
            out.get("tracestate").map(|v| v.as_bytes()),
            Some(&b"vendor=x"[..])
        );
    }

    #[test]
    fn garbage_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "00-xyz",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(bad) {
                h.insert("traceparent", v);
            }
            let cx = TraceContextPropagator::new().extract(&Headers(&h));
            assert!(!cx.span().span_context().is_valid(), "{bad:?}");
        }
    }
}
