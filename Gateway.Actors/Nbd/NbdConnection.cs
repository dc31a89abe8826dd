using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;
using Gateway.Actors.Exports;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Nbd;

/// <summary>One NBD client connection over a stream: handshake, then transmission.</summary>
public static class NbdConnection
{
    /// <summary>
    /// Serves the client until it leaves or <paramref name="stopping"/> fires. A client that
    /// breaks the protocol or vanishes ends only its own connection; failures of the server
    /// itself propagate to the caller (the connection actor, and its supervisor).
    /// </summary>
    public static async Task ServeAsync(Stream stream, IExportDirectory exports, ILogger logger, CancellationToken stopping, EndPoint? client = null)
    {
        PipeReader input = PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: 256 * 1024, minimumReadSize: 64 * 1024, leaveOpen: true));
        PipeWriter output = PipeWriter.Create(stream, new StreamPipeWriterOptions(minimumBufferSize: 64 * 1024, leaveOpen: true));
        try
        {
            NegotiatedSession? session = await new OptionNegotiator(input, output, exports, logger).NegotiateAsync(stopping).ConfigureAwait(false);
            if (session is null)
            {
                return;
            }
            logger.LogInformation("NBD connection from {Client} to export {Export}: structured replies {Structured}, contexts [{Contexts}]",
                client, session.Export.Info.Name, session.StructuredReplies, string.Join(", ", session.Contexts.Select(c => c.Context.Name)));
            var transmission = new Transmission(input, output, stream, session, logger);
            try
            {
                await transmission.RunAsync(stopping).ConfigureAwait(false);
            }
            finally
            {
                logger.LogInformation("NBD connection from {Client} to export {Export} closed after {Requests} requests",
                    client, session.Export.Info.Name, transmission.Requests);
            }
        }
        catch (NbdProtocolException e)
        {
            logger.LogInformation("Closing NBD connection: {Reason}", e.Message);
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
            await input.CompleteAsync().ConfigureAwait(false);
            try
            {
                await output.CompleteAsync().ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
            {
                // The client is already gone; nothing left to tell it.
            }
        }
    }
}
