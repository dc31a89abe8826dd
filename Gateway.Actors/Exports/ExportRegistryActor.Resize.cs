using System.Diagnostics;
using Akka.Actor;
using Akka.Event;
using Gateway.Actors.Telemetry;

namespace Gateway.Actors.Exports;

/// <summary>Growing an export online (the CSI driver's ControllerExpandVolume).</summary>
public sealed partial class ExportRegistryActor
{
    private static readonly TimeSpan GrowTimeout = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Decides, records the new size, then has the export's owner grow its device. The record comes
    /// first, as for a snapshot: a crash before the owner grew reopens the export at the recorded
    /// size, and opening grows storage that is shorter (<see cref="BackendFactory"/>). The same size
    /// records nothing but still asks the owner, so repeating a resize whose grow failed finishes it.
    /// </summary>
    private void Resize(ResizeExport resize)
    {
        Activity? activity = GatewayTelemetry.ActivitySource.StartActivity("export.resize");
        activity?.SetTag("export", resize.ExportName);
        activity?.SetTag("size", resize.Size);
        (IExportEvent? @event, CommandResult? error) = _catalog.Decide(resize);
        if (error is not null)
        {
            activity?.SetStatus(ActivityStatusCode.Error, error.Message);
            activity?.Dispose();
            Sender.Tell(error);
            return;
        }
        IActorRef sender = Sender;
        if (@event is null)
        {
            Grow(_catalog.Exports[resize.ExportName], sender, activity);
            return;
        }
        Persist(@event, e =>
        {
            _catalog = _catalog.Apply(e);
            JournalDurability.Sync();
            ExportSpec spec = _catalog.Exports[resize.ExportName];
            _log.Info("Export {0} resized to {1} bytes", spec.Name, spec.Size);
            MaybeSnapshot();
            Grow(spec, sender, activity);
        });
    }

    /// <summary>The owner grows the device and bitmaps, then shows the new size to new connections; it answers the client.</summary>
    private void Grow(ExportSpec spec, IActorRef replyTo, Activity? activity)
    {
        // Not running here (single node: it failed to open): it opens at the recorded size.
        Task<CommandResult> grown = TryAskExport(spec.Name, new GrowExport(spec), GrowTimeout, out Task<CommandResult> answer)
            ? answer
            : Task.FromResult(CommandResult.Ok(new ExportStatus(spec, null)));
        string name = spec.Name;
        grown.PipeTo(replyTo, failure: f => CommandResult.Fail(ExportErrorKind.Failed, $"growing '{name}' failed: {f.Message}"));
        activity?.Dispose();
    }
}
