using System.IO.Pipelines;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using Gateway.Actors.Telemetry;
using Gateway.Actors.Tls;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Nbd;

/// <summary>One NBD client connection over a stream: handshake (with an optional TLS upgrade), then transmission.</summary>
public static class NbdConnection
{
    /// <summary>
    /// Serves the client until it leaves or <paramref name="stopping"/> fires. A client that
    /// breaks the protocol, fails the TLS handshake or vanishes ends only its own connection;
    /// failures of the server itself propagate to the caller (the connection actor, and its
    /// supervisor). The caller owns <paramref name="stream"/>; a TLS layer put over it is
    /// closed here.
    /// </summary>
    public static async Task ServeAsync(Stream stream, IExportDirectory exports, ILogger logger, CancellationToken stopping,
        EndPoint? client = null, NbdServerSettings? settings = null)
    {
        settings ??= NbdServerSettings.Default;
        // One deadline over the whole handshake, TLS included: every await of the negotiation is
        // on the socket and takes this token, so a silent or trickling client holds no thread
        // and is cut off at the deadline whatever step it stalls in. Opening an export stops the
        // clock (HandshakeDeadline): that time is the server's, not the client's.
        using var handshake = new HandshakeDeadline(settings.HandshakeTimeout, stopping, settings.Time);
        SslStream? tls = null;
        if (settings.TlsFirst)
        {
            tls = await TlsFirstAsync(stream, settings, client, logger, handshake.Token, stopping).ConfigureAwait(false);
            if (tls is null)
            {
                return;
            }
        }
        (PipeReader input, PipeWriter output) = CreatePipes(tls ?? stream);
        using var negotiator = new OptionNegotiator(input, output, exports, logger, settings, client, handshake);
        try
        {
            NegotiationOutcome outcome;
            string phase = "option negotiation";
            try
            {
                outcome = await negotiator.NegotiateAsync(handshake.Token).ConfigureAwait(false);
                if (outcome.End == NegotiationEnd.StartTls)
                {
                    // The ACK is flushed and nothing of the client's is buffered (the negotiator checked):
                    // the plaintext pipes can go, and the next byte on the stream is the ClientHello.
                    await input.CompleteAsync().ConfigureAwait(false);
                    await output.CompleteAsync().ConfigureAwait(false);
                    phase = "TLS handshake";
                    (tls, ClientIdentity? identity) = await UpgradeAsync(stream, settings, client, logger, handshake.Token).ConfigureAwait(false);
                    (input, output) = CreatePipes(tls);
                    phase = "option negotiation over TLS";
                    outcome = await negotiator.ResumeAfterTlsAsync(input, output, identity, handshake.Token).ConfigureAwait(false);
                }
            }
            catch (OperationCanceledException) when (handshake.Expired)
            {
                GatewayTelemetry.HandshakeTimedOut();
                logger.LogWarning("Closing NBD connection from {Client}: handshake not finished within {Timeout} s (stalled in {Phase})",
                    client, settings.HandshakeTimeout.TotalSeconds, phase);
                return;
            }
            // Attached (or closed): the deadline no longer applies; an idle attached client is fine.
            handshake.End();
            if (outcome.Session is not NegotiatedSession session)
            {
                return;
            }
            logger.LogInformation("NBD connection from {Client} to export {Export}: {Transport}, {Headers} headers, structured replies {Structured}, contexts [{Contexts}]",
                client, session.Export.Info.Name, tls is null ? "plaintext" : $"{tls.SslProtocol} {tls.NegotiatedCipherSuite}",
                session.ExtendedHeaders ? "extended" : "compact", session.StructuredReplies || session.ExtendedHeaders,
                string.Join(", ", session.Contexts.Select(c => c.Context.Name)));
            // Large reads go straight to the stream under the pipe: after STARTTLS that is the TLS stream.
            var transmission = new Transmission(input, output, tls ?? stream, session, logger);
            try
            {
                await transmission.RunAsync(stopping).ConfigureAwait(false);
            }
            finally
            {
                if (session.Export.OwnedByConnection && session.Export.Device is IAsyncDisposable owned)
                {
                    await owned.DisposeAsync().ConfigureAwait(false);
                }
                logger.LogInformation("NBD connection from {Client} to export {Export} closed after {Requests} requests",
                    client, session.Export.Info.Name, transmission.Requests);
            }
        }
        catch (NbdProtocolException e)
        {
            logger.LogInformation("Closing NBD connection from {Client}: {Reason}", client, e.Message);
        }
        catch (AuthenticationException e)
        {
            logger.LogWarning("TLS handshake with NBD client {Client} failed: {Reason}", client, e.InnerException?.Message ?? e.Message);
        }
        catch (Exception e) when (e is IOException or EndOfStreamException or SocketException)
        {
            logger.LogDebug("NBD connection closed by the client: {Reason}", e.Message);
        }
        catch (OperationCanceledException) when (stopping.IsCancellationRequested)
        {
            logger.LogDebug("NBD connection closed: server stopping");
        }
        finally
        {
            try
            {
                await input.CompleteAsync().ConfigureAwait(false);
                await output.CompleteAsync().ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException or InvalidOperationException)
            {
                // The client is already gone; nothing left to tell it.
            }
            if (tls is not null)
            {
                await tls.DisposeAsync().ConfigureAwait(false);
            }
        }
    }

    /// <summary>
    /// The TLS handshake before any NBD byte (<see cref="NbdServerSettings.TlsFirst"/>); null, with
    /// the reason logged, when the client is refused, breaks it off or stalls.
    /// </summary>
    private static async Task<SslStream?> TlsFirstAsync(Stream stream, NbdServerSettings settings, EndPoint? client, ILogger logger,
        CancellationToken handshake, CancellationToken stopping)
    {
        try
        {
            (SslStream tls, _) = await UpgradeAsync(stream, settings, client, logger, handshake).ConfigureAwait(false);
            return tls;
        }
        catch (AuthenticationException e)
        {
            logger.LogWarning("TLS handshake with {Client} failed, closing before NBD: {Reason}", client, e.InnerException?.Message ?? e.Message);
        }
        catch (NbdProtocolException e)
        {
            logger.LogWarning("Closing connection from {Client} before NBD: {Reason}", client, e.Message);
        }
        catch (OperationCanceledException) when (!stopping.IsCancellationRequested)
        {
            GatewayTelemetry.HandshakeTimedOut();
            logger.LogWarning("Closing connection from {Client}: TLS handshake not finished within {Timeout} s", client, settings.HandshakeTimeout.TotalSeconds);
        }
        catch (Exception e) when (e is IOException or EndOfStreamException or SocketException or OperationCanceledException)
        {
            logger.LogDebug("Connection from {Client} closed during the TLS handshake: {Reason}", client, e.Message);
        }
        return null;
    }

    private const int ServerReadAhead = 64 * 1024;

    private static (PipeReader Input, PipeWriter Output) CreatePipes(Stream stream) => (
        PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: 256 * 1024, minimumReadSize: 64 * 1024, leaveOpen: true)),
        PipeWriter.Create(stream, new StreamPipeWriterOptions(minimumBufferSize: 64 * 1024, leaveOpen: true)));

    /// <summary>
    /// The server side of the TLS handshake on the raw stream, bounded in time so a client that
    /// stalls after STARTTLS does not hold the connection. Returns the TLS stream and the client's
    /// validated certificate identity (null when it presented none).
    /// </summary>
    private static async Task<(SslStream Tls, ClientIdentity? Identity)> UpgradeAsync(Stream stream, NbdServerSettings settings, EndPoint? client,
        ILogger logger, CancellationToken stopping)
    {
        TlsCredentials credentials = settings.Tls ?? throw new InvalidOperationException("STARTTLS accepted without TLS credentials");
        // Several TLS records per receive (ReadAheadStream); a smaller buffer than a peer client's,
        // as requests are mostly small and a server holds many connections.
        var tls = new SslStream(new ReadAheadStream(stream, ServerReadAhead, leaveOpen: true), leaveInnerStreamOpen: true);
        try
        {
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(stopping);
            timeout.CancelAfter(settings.TlsHandshakeTimeout);
            try
            {
                await tls.AuthenticateAsServerAsync(credentials.ServerOptions(client), timeout.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (!stopping.IsCancellationRequested)
            {
                throw new NbdProtocolException($"TLS handshake not finished within {settings.TlsHandshakeTimeout.TotalSeconds} s");
            }
            ClientIdentity? identity = null;
            if (tls.RemoteCertificate is X509Certificate presented)
            {
                using X509Certificate2 certificate = X509CertificateLoader.LoadCertificate(presented.GetRawCertData());
                identity = ClientIdentity.From(certificate);
            }
            logger.LogInformation("NBD client {Client} upgraded to {Protocol}; client certificate {Identity}",
                client, tls.SslProtocol, identity?.ToString() ?? "(none)");
            return (tls, identity);
        }
        catch
        {
            await tls.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }
}
