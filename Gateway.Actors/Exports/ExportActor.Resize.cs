using Akka.Actor;
using Akka.Event;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Nbd;
using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>Growing the export while clients stay connected.</summary>
public sealed partial class ExportActor
{
    private static readonly TimeSpan GrowBitmapsTimeout = TimeSpan.FromSeconds(30);

    // The device as opened, before any decorator wraps it: the one that grows.
    private IBlockDevice? _backend;

    /// <summary>
    /// Grows the device, then the bitmaps, then hands new connections a handle with the new size.
    /// In that order: no client can write past the old end before every bitmap covers it (a
    /// bitmap too short would not mark such a write). Connections already attached keep their
    /// handle and its size (NBD cannot tell a client the size changed), so their requests past
    /// the old end get the errors they got before; they see the new size when they reconnect.
    /// Nothing closes, so no connection breaks and no request is lost.
    /// </summary>
    private async Task GrowAsync(GrowExport grow)
    {
        IActorRef sender = Sender;
        ExportSpec spec = grow.Spec;
        try
        {
            if (_handle is not { } handle || _closing is not null)
            {
                throw new InvalidOperationException($"export '{_spec.Name}' is closing");
            }
            if (spec.Size > handle.Info.Size)
            {
                if (_backend is not IGrowableDevice growable)
                {
                    throw new NotSupportedException($"the backend of '{_spec.Name}' cannot grow while it serves");
                }
                // No ConfigureAwait(false): the continuations must run on the actor.
                await growable.GrowAsync(spec.Size, CancellationToken.None);
                if (!_bitmaps.IsNobody())
                {
                    await _bitmaps.Ask<BitmapResult>(new GrowBitmaps(spec.Size), GrowBitmapsTimeout);
                }
                _handle = new ExportHandle(handle.Info with { Size = spec.Size }, handle.Device, handle.MetaContexts, handle.Closed);
                // New connections open through the bitmaps actor: it answers with this handle, and
                // keeps its contexts (bitmaps added later) up to date.
                _bitmaps.Tell(new AttachExportHandle(_handle));
                _log.Info("Export {0} grew from {1} to {2} bytes; connections see the new size when they reconnect", spec.Name, handle.Info.Size, spec.Size);
            }
            _spec = spec;
            sender.Tell(CommandResult.Ok(new ExportStatus(_spec, _handle.Info)));
        }
        catch (Exception e)
        {
            _log.Error(e, "Growing export {0} to {1} bytes failed", _spec.Name, spec.Size);
            sender.Tell(CommandResult.Fail(ExportErrorKind.Failed, $"growing '{_spec.Name}' to {spec.Size} bytes failed: {e.Message}"));
        }
    }
}
