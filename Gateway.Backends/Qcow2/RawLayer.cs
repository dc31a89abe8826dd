namespace Gateway.Backends.Qcow2;

/// <summary>A raw backing file: every byte up to its length is data.</summary>
internal sealed class RawLayer : ImageLayer
{
    private readonly ImageSource _file;

    public RawLayer(ImageSource file) => (_file, VirtualSize) = (file, file.Length);

    public override string Format => "raw";

    public override long VirtualSize { get; }

    public override LayerRun Map(long offset, long length) => new(length, RunKind.Data, offset);

    public override bool TryMapNoWait(long offset, long length, out LayerRun run)
    {
        run = Map(offset, length);
        return true;
    }

    public override void Read(LayerRun run, long guestOffset, Span<byte> destination) =>
        _file.ReadZeroPadded(guestOffset, destination);

    public override bool TryReadNoWait(LayerRun run, long guestOffset, Span<byte> destination) =>
        _file.TryReadNoWait(destination, guestOffset);

    public override void Dispose() => _file.Dispose();
}
