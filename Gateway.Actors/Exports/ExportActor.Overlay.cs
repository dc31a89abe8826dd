using Akka.Actor;
using Akka.Event;
using Gateway.Actors.Nbd;
using Gateway.Backends.Overlay;

namespace Gateway.Actors.Exports;

/// <summary>The overlay side of an export: its depth context and the snapshot switch.</summary>
public sealed partial class ExportActor
{
    // The device as opened, before any decorator wraps it.
    private OverlayBackend? _overlay;

    private MetaContext[] OverlayContexts() => _overlay is null ? [] : [new AllocationDepthContext(_overlay)];

    /// <summary>
    /// Freezes the top and pushes the new layer (already created and recorded by the registry).
    /// Connections keep their device: the overlay switches inside, so nothing reconnects.
    /// </summary>
    private async Task PushLayerAsync(PushLayer push)
    {
        IActorRef sender = Sender;
        try
        {
            if (_overlay is null)
            {
                throw new InvalidOperationException($"export '{_spec.Name}' is not open as an overlay");
            }
            if (_spec.Backend.Layers is [string top, ..] && top == push.LayerId)
            {
                // Opened after the snapshot was recorded (a cluster entity started by this very
                // message): the new layer is already on top.
                _spec = push.Spec;
                sender.Tell(CommandResult.Ok(new ExportStatus(_spec, _handle?.Info)));
                return;
            }
            // No ConfigureAwait(false): the continuation must run on the actor.
            Layer layer = await _backends.OpenTopLayerAsync(push.LayerId, CancellationToken.None);
            try
            {
                // No ConfigureAwait(false): the continuation must run on the actor, which sets _spec and replies.
                await _overlay.PushTopAsync(layer);
            }
            catch
            {
                layer.Dispose();
                throw;
            }
            _spec = push.Spec;
            sender.Tell(CommandResult.Ok(new ExportStatus(_spec, _handle?.Info)));
        }
        catch (Exception e)
        {
            _log.Error(e, "Snapshot of export {0} failed", _spec.Name);
            sender.Tell(CommandResult.Fail(ExportErrorKind.Failed, $"snapshot of '{_spec.Name}' failed: {e.Message}"));
        }
    }
}
