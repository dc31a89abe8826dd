using Gateway.Fuzz;
using SharpFuzz;

// Gateway.Fuzz HARNESS            under afl-fuzz (instrumented build, see ops/fuzz)
// Gateway.Fuzz HARNESS FILE...    runs the files once each (FUZZ_REPEAT times), e.g. to replay a finding
if (args.Length == 0 || !Harnesses.All.TryGetValue(args[0], out Func<byte[], Task>? harness))
{
    Console.Error.WriteLine($"usage: Gateway.Fuzz {{{string.Join('|', Harnesses.All.Keys)}}} [FILE...]");
    return 2;
}

// One worker thread (ops/fuzz sets DOTNET_PROCESSOR_COUNT=1, below which the pool cannot be
// capped): the reader loop, the reply writer and the requests then take turns on one thread in
// a fixed order, so an input traces the same edges every run (SharpFuzz's previous-location
// register is one static shared by all threads; concurrent threads would scramble it).
if (!ThreadPool.SetMinThreads(1, 1) || !ThreadPool.SetMaxThreads(1, 1))
{
    Console.Error.WriteLine("Gateway.Fuzz: could not limit the thread pool to one thread (set DOTNET_PROCESSOR_COUNT=1): coverage will be unstable");
}

if (args.Length > 1)
{
    int failed = 0;
    int repeat = int.TryParse(Environment.GetEnvironmentVariable("FUZZ_REPEAT"), out int n) ? n : 1;
    foreach (string file in args[1..])
    {
        try
        {
            byte[] input = File.ReadAllBytes(file);
            for (int i = 0; i < repeat; i++)
            {
                if (!Task.Run(() => harness(input)).Wait(TimeSpan.FromSeconds(10)))
                {
                    throw new TimeoutException($"run {i + 1} of {repeat} still going after 10 s: a hang");
                }
            }
            Console.WriteLine($"{file}: handled");
        }
        catch (Exception e)
        {
            failed++;
            Console.WriteLine($"{file}: {e}");
        }
    }
    return failed == 0 ? 0 : 1;
}

Fuzzer.OutOfProcess.Run(stream =>
{
    using var input = new MemoryStream();
    stream.CopyTo(input);
    RunOnThreadPool(harness, input.ToArray());
});
return 0;

// The harness on a pool thread while this one only waits: no two threads run harness code at once.
static void RunOnThreadPool(Func<byte[], Task> harness, byte[] input) =>
    Task.Run(() => harness(input)).GetAwaiter().GetResult();
